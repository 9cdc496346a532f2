// The chat page: a multi-turn conversation kept here, each turn streamed from
// POST /v1/chat/completions (OpenAI's chat.completion.chunk events over SSE).
// Model output only ever enters the page as text nodes, never as HTML.
"use strict";

(function () {
  // ------------------------------------------------------------------ SSE parsing

  // Server-sent events from a stream of text that may be cut anywhere (inside a line,
  // between "\r" and "\n", inside a multi-byte character: the caller's TextDecoder
  // keeps those). onData(data) is called with each event's data lines joined by "\n".
  class SSEParser {
    constructor(onData) {
      this.onData = onData;
      this.buffer = "";
      this.data = [];
    }

    push(text) {
      this.buffer += text;
      // A trailing "\r" may be the first half of "\r\n": keep it for the next read.
      const end = this.buffer.endsWith("\r") ? this.buffer.length - 1 : this.buffer.length;
      const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
      this.buffer = lines.pop() + this.buffer.slice(end);
      for (const line of lines) this.line(line);
    }

    // The stream ended: an event not closed by a blank line still counts.
    end() {
      if (this.buffer) this.line(this.buffer.replace(/\r$/, ""));
      this.buffer = "";
      this.line("");
    }

    line(line) {
      if (line === "") {
        if (this.data.length) {
          const data = this.data.join("\n");
          this.data = [];
          this.onData(data);
        }
        return;
      }
      if (line.startsWith(":")) return; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
    }
  }

  // The message of an OpenAI-style error: {"error": {"message": ...}}, {"error": "..."},
  // FastAPI's {"detail": ...}, or anything else as text.
  function errorMessage(body, fallback) {
    if (body && typeof body === "object") {
      const error = body.error !== undefined ? body.error : body.detail;
      if (typeof error === "string" && error) return error;
      if (error && typeof error === "object") {
        if (typeof error.message === "string" && error.message) return error.message;
        if (Array.isArray(error)) return error.map((e) => (e && e.msg) || JSON.stringify(e)).join("; ");
        return JSON.stringify(error);
      }
      if (Array.isArray(body.detail)) return body.detail.map((e) => (e && e.msg) || JSON.stringify(e)).join("; ");
    }
    return fallback;
  }

  class ServerError extends Error {}

  // A server started with API keys answers 401: the page asks for the key once and keeps it for
  // this tab (sessionStorage), sending it as the OpenAI SDK does.
  const KEY_STORAGE = "llmserve.apiKey";

  async function authorizedFetch(url, options) {
    for (let asked = 0; ; asked += 1) {
      const key = sessionStorage.getItem(KEY_STORAGE);
      const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
      const response = await fetch(url, { ...options, headers });
      if (response.status !== 401 || asked >= 2) return response;
      const entered = window.prompt(key ? "That API key was refused. API key:" : "This server needs an API key:");
      if (!entered || !entered.trim()) return response;
      sessionStorage.setItem(KEY_STORAGE, entered.trim());
    }
  }

  // Streams one chat completion. Calls onDelta(text) for each piece of content, and returns
  // {usage, finishReason, chunks}; throws ServerError with the server's message on an
  // error, and the fetch's AbortError when `signal` aborts.
  async function streamChat(request, signal, onDelta) {
    const response = await authorizedFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(request),
      signal,
    });
    if (!response.ok) {
      const text = await response.text();
      let body = null;
      try {
        body = JSON.parse(text);
      } catch (_) {
        /* not JSON: the text itself */
      }
      throw new ServerError(errorMessage(body, text.trim() || `HTTP ${response.status} ${response.statusText}`));
    }
    const result = { usage: null, finishReason: null, chunks: 0, done: false };
    let failure = null;
    const parser = new SSEParser((data) => {
      if (failure || result.done) return;
      if (data.trim() === "[DONE]") {
        result.done = true;
        return;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        failure = new ServerError(`unreadable event from the server: ${data.slice(0, 200)}`);
        return;
      }
      if (event.error !== undefined) {
        failure = new ServerError(errorMessage(event, "the server reported an error"));
        return;
      }
      if (event.usage) result.usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
      const content = choice.delta && choice.delta.content;
      if (typeof content === "string" && content) {
        result.chunks += 1;
        onDelta(content);
      }
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
        if (failure || result.done) break;
      }
      if (!failure && !result.done) {
        parser.push(decoder.decode());
        parser.end();
      }
    } finally {
      if (failure || result.done) reader.cancel().catch(() => {});
    }
    if (failure) throw failure;
    return result;
  }

  // ------------------------------------------------------------------ the page

  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"),
    empty: $("empty"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    composer: $("composer"),
    newChat: $("new-chat"),
    model: $("model"),
    ttft: $("ttft"),
    tps: $("tps"),
    error: $("error"),
    settings: $("settings"),
    settingsToggle: $("settings-toggle"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    systemPrompt: $("system-prompt"),
    ignoreEos: $("ignore-eos"),
  };

  const state = {
    conversation: [], // {role, content} of the finished turns
    model: null,
    controller: null, // the AbortController of the answer streaming now
  };

  function showError(text) {
    els.error.textContent = text;
    els.error.hidden = !text;
  }

  // Appends streamed text to `content` once per frame (as a text node: never parsed as HTML), and
  // keeps the page scrolled to the end when it was there: one layout per frame, not one per token.
  class TextSink {
    constructor(content) {
      this.content = content;
      this.pending = "";
      this.scheduled = false;
    }

    add(text) {
      this.pending += text;
      if (this.scheduled) return;
      this.scheduled = true;
      if (document.hidden) setTimeout(() => this.flush(), 100); // no frames in a hidden tab
      else requestAnimationFrame(() => this.flush());
    }

    flush() {
      this.scheduled = false;
      if (!this.pending) return;
      const el = document.scrollingElement || document.documentElement;
      const atEnd = el.scrollHeight - el.scrollTop - el.clientHeight < 160;
      this.content.appendChild(document.createTextNode(this.pending));
      this.pending = "";
      if (atEnd) el.scrollTop = el.scrollHeight;
    }
  }

  function addMessage(role, text) {
    els.empty.hidden = true;
    const message = document.createElement("article");
    message.className = `message ${role}`;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    if (text) content.appendChild(document.createTextNode(text));
    message.append(label, content);
    els.messages.appendChild(message);
    document.documentElement.scrollTop = document.documentElement.scrollHeight;
    return message;
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.disabled = !busy;
    els.newChat.disabled = false;
    document.body.classList.toggle("busy", busy);
  }

  function readSettings() {
    let maxTokens = Number.parseInt(els.maxTokens.value, 10);
    if (!Number.isFinite(maxTokens) || maxTokens < 1) maxTokens = 256;
    let temperature = Number.parseFloat(els.temperature.value);
    if (!Number.isFinite(temperature) || temperature < 0) temperature = 0;
    return { maxTokens, temperature, ignoreEos: els.ignoreEos.checked, system: els.systemPrompt.value.trim() };
  }

  function formatStats(stats) {
    const parts = [];
    if (stats.ttftMs !== null) parts.push(`TTFT ${Math.round(stats.ttftMs)} ms`);
    if (stats.tps !== null) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
    if (stats.tokens !== null) parts.push(`${stats.tokens}${stats.estimated ? " chunks" : " tokens"}`);
    if (stats.finish) parts.push(stats.finish);
    return parts.join(" · ");
  }

  async function send() {
    const text = els.prompt.value;
    if (!text.trim() || state.controller) return;
    showError("");
    const settings = readSettings();
    const conversation = state.conversation; // New chat replaces it: a late answer stays out of the new one
    const messages = [];
    if (settings.system) messages.push({ role: "system", content: settings.system });
    messages.push(...conversation, { role: "user", content: text });
    const request = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: settings.maxTokens,
      temperature: settings.temperature,
    };
    if (settings.ignoreEos) request.ignore_eos = true;
    if (state.model) request.model = state.model;

    const userMessage = addMessage("user", text);
    const answer = addMessage("assistant", "");
    answer.dataset.state = "streaming";
    answer.classList.add("streaming");
    const content = answer.querySelector(".content");
    const meta = document.createElement("div");
    meta.className = "meta";
    answer.appendChild(meta);
    els.prompt.value = "";
    autoGrow();
    els.ttft.textContent = "…";
    els.tps.textContent = "…";

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    const started = performance.now();
    let first = null;
    let last = null;
    let received = "";
    let chunks = 0;
    const stats = { ttftMs: null, tps: null, tokens: null, estimated: false, finish: null };

    const sink = new TextSink(content);
    const onDelta = (piece) => {
      last = performance.now();
      if (first === null) {
        first = last;
        stats.ttftMs = first - started;
        els.ttft.textContent = String(Math.round(stats.ttftMs));
      }
      chunks += 1;
      received += piece;
      sink.add(piece);
    };

    let result = null;
    let stopped = false;
    let failure = null;
    try {
      result = await streamChat(request, controller.signal, onDelta);
    } catch (error) {
      if (error && error.name === "AbortError") stopped = true;
      else failure = error;
    }
    sink.flush();
    state.controller = null;
    setBusy(false);
    answer.classList.remove("streaming");

    if (failure) {
      const message = failure instanceof ServerError ? failure.message : `request failed: ${failure.message || failure}`;
      answer.classList.add("error");
      answer.dataset.state = "error";
      const note = document.createElement("div");
      note.className = "error-text";
      note.textContent = message;
      answer.appendChild(note);
      showError(message);
      // A failed turn is not part of the conversation: give its text back to retry.
      userMessage.classList.add("failed");
      if (!els.prompt.value) els.prompt.value = text;
      autoGrow();
      if (!received) {
        els.ttft.textContent = "–";
        els.tps.textContent = "–";
        meta.remove();
        return;
      }
    }

    const usageTokens = result && result.usage && Number.isFinite(result.usage.completion_tokens)
      ? result.usage.completion_tokens : null;
    stats.tokens = usageTokens !== null ? usageTokens : chunks;
    stats.estimated = usageTokens === null;
    stats.finish = stopped ? "stopped" : (result && result.finishReason) || (failure ? "error" : null);
    const end = last !== null ? last : performance.now();
    const seconds = (end - started) / 1000;
    stats.tps = stats.tokens > 0 && seconds > 0 ? stats.tokens / seconds : null;
    els.ttft.textContent = stats.ttftMs !== null ? String(Math.round(stats.ttftMs)) : "–";
    els.tps.textContent = stats.tps !== null ? stats.tps.toFixed(1) : "–";
    meta.textContent = formatStats(stats);
    if (result && result.usage) {
      answer.dataset.promptTokens = String(result.usage.prompt_tokens);
      answer.dataset.completionTokens = String(result.usage.completion_tokens);
    }
    if (stats.finish) answer.dataset.finishReason = stats.finish;
    if (stats.estimated && stats.tokens !== null) {
      meta.title = "No usage from the server (the answer was stopped): tokens/s counts the streamed chunks";
    }
    if (!failure) {
      answer.classList.add(stopped ? "stopped" : "done");
      answer.dataset.state = stopped ? "stopped" : "done";
      if (received) conversation.push({ role: "user", content: text }, { role: "assistant", content: received });
      else userMessage.classList.add("failed"); // stopped before any text: not part of the conversation
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.conversation = [];
    for (const node of [...els.messages.querySelectorAll(".message")]) node.remove();
    els.empty.hidden = false;
    els.ttft.textContent = "–";
    els.tps.textContent = "–";
    showError("");
    els.prompt.focus();
  }

  function autoGrow() {
    els.prompt.style.height = "auto";
    const height = els.prompt.scrollHeight + (els.prompt.offsetHeight - els.prompt.clientHeight);
    els.prompt.style.height = `${Math.min(height, 240)}px`;
    els.prompt.style.overflowY = height > 240 ? "auto" : "hidden";
  }

  async function loadModel() {
    try {
      const response = await authorizedFetch("/v1/models", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      const model = body && Array.isArray(body.data) && body.data[0] && body.data[0].id;
      if (!model) throw new Error("no model listed");
      state.model = model;
      els.model.textContent = model;
      els.model.classList.remove("unavailable");
    } catch (error) {
      els.model.textContent = "model unavailable";
      els.model.title = `GET /v1/models failed: ${error.message || error}`;
      els.model.classList.add("unavailable");
    }
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  els.prompt.addEventListener("input", autoGrow);
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);
  els.settingsToggle.addEventListener("click", () => {
    const open = els.settings.hidden;
    els.settings.hidden = !open;
    els.settingsToggle.setAttribute("aria-expanded", String(open));
  });
  els.temperature.addEventListener("input", () => {
    els.temperatureValue.textContent = Number.parseFloat(els.temperature.value).toFixed(2);
  });
  els.temperatureValue.textContent = Number.parseFloat(els.temperature.value).toFixed(2);

  // For tests and the console: the parser and the conversation sent with the next turn.
  window.chatPage = { SSEParser, errorMessage, state };

  loadModel();
  autoGrow();
  els.prompt.focus();
})();
