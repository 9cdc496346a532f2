"""`make bench`: streaming performance of this server side by side with a naive server and the engine."""
