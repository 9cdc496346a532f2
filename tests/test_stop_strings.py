"""Stop strings: matched on text, partial matches held back, output cut where the stop starts."""

from llmserve.engine.detokenizer import TextUnit
from llmserve.engine.output_buffer import OutputBuffer
from llmserve.engine.stop_strings import StopStringMatcher


def feed(buffer: OutputBuffer, pieces: list[str], check_stop: bool = True):
    """Feed text pieces as consecutive one-token units; return (emitted texts per step, stopped)."""
    emitted, offset = [], 10
    for piece in pieces:
        unit = TextUnit(offset - 1, offset, offset + 1, piece)
        offset += 1
        if buffer.add(unit, check_stop):
            emitted.append(buffer.take())
            return emitted, True
        emitted.append(buffer.take())
    return emitted, False


def texts(emissions):
    return [e.text if e else "" for e in emissions]


def test_matcher_find_and_hold():
    m = StopStringMatcher(("\n\n", "THE END"))
    assert m.find("once\n\nupon") == 4
    assert m.find("no stop here") == -1
    assert m.hold_from("the story. THE E") == len("the story. ")
    assert m.hold_from("text\n") == 4
    assert m.hold_from("plain text") == len("plain text")


def test_stop_string_is_not_in_output_and_stops():
    buffer = OutputBuffer(StopStringMatcher(("END",)))
    emitted, stopped = feed(buffer, ["Hello", " wor", "ld", " E", "N", "D", " more"])
    assert stopped
    assert "".join(texts(emitted)) == "Hello world "
    assert emitted[-1].text_length == len(" ")  # cut inside the held unit run


def test_partial_match_is_held_then_released_when_it_fails():
    buffer = OutputBuffer(StopStringMatcher(("END",)))
    emitted, stopped = feed(buffer, ["a", " E", "N", "x", "y"])
    assert not stopped
    assert texts(emitted) == ["a", "", "", " ENx", "y"]


def test_stop_spanning_tokens_cut_mid_token():
    buffer = OutputBuffer(StopStringMatcher(("lo wor",)))
    emitted, stopped = feed(buffer, [" Hel", "lo", " world", "!"])
    assert stopped
    assert "".join(texts(emitted)) == " Hel"


def test_finish_releases_a_pending_partial_match():
    buffer = OutputBuffer(StopStringMatcher(("END",)))
    emitted, _ = feed(buffer, ["story", " EN"])
    assert texts(emitted) == ["story", ""]
    buffer.finish()
    assert buffer.take().text == " EN"


def test_check_stop_false_releases_everything():
    buffer = OutputBuffer(StopStringMatcher(("END",)))
    emitted, stopped = feed(buffer, ["a", "END", "b"], check_stop=False)
    assert not stopped and texts(emitted) == ["a", "END", "b"]


def test_unsent_emissions_accumulate_into_one_window():
    buffer = OutputBuffer(StopStringMatcher(("!",)))
    for i, piece in enumerate(["one", " two", " three!", " four"]):
        if buffer.add(TextUnit(9 + i, 10 + i, 11 + i, piece), check_stop=True):
            break
    emission = buffer.take()
    assert (emission.prefix_offset, emission.read_offset, emission.end_offset) == (9, 10, 13)
    assert emission.text == "one two three" and emission.text_length == len("one two three")
