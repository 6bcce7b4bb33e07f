/* edge-slm kiosk page: a chat with streamed answers over `edge-slm serve`.
 *
 * No build step, no dependencies, nothing fetched from the network: the page talks
 * only to the server that serves it (or to `api_base`). Settings come from
 * config.json next to this file, then from query parameters (see README.md).
 */
(function () {
  "use strict";

  const DEFAULTS = {
    title: "Help desk",
    welcome: "Hello! Ask me a question.",
    system_prompt:
      "You are the help desk of this building. Answer in one to three short, friendly sentences.",
    api_base: "", // "" = the server that serves this page
    api_key: "", // sent as "Authorization: Bearer ..." (visible to anyone who opens the page)
    model: "", // "" = let the server pick its generator
    embedding_model: "", // "" = let the server pick its embedder
    max_tokens: 200,
    temperature: 0.7,
    max_history_messages: 8, // earlier turns sent with each question (small models: small context)
    idle_timeout_s: 90, // start over after this long without a touch; 0 = never
    idle_warning_s: 10, // show a countdown this long before starting over
    faq: [], // [{"question": "...", "answer": "..."}]: quick-answer buttons
    faq_buttons: 4, // how many FAQ buttons to show
    faq_threshold: 0.8, // cosine similarity above which a typed question gets the FAQ answer
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    title: $("title"),
    status: $("status"),
    reset: $("reset"),
    conversation: $("conversation"),
    welcome: $("welcome"),
    error: $("error"),
    errorText: $("error-text"),
    retry: $("retry"),
    faq: $("faq"),
    form: $("ask"),
    question: $("question"),
    send: $("send"),
    idle: $("idle"),
    idleSeconds: $("idle-seconds"),
    idleStay: $("idle-stay"),
  };

  let config = Object.assign({}, DEFAULTS);
  let history = []; // [{role, content}] without the system prompt
  let current = null; // {controller, answerEl} while an answer streams
  let failed = null; // {text, userEl, answerEl} of the last question that got an error
  let lastActivity = Date.now();
  let faqVectors = null; // unit-length embeddings of the FAQ questions, or null

  /* ---------- Server-sent events ---------- */

  /** Incremental parser for a text/event-stream body (WHATWG HTML, "server-sent events").
   *  push(text) takes decoded text in chunks of any size (split anywhere, even inside a
   *  line or between "\r" and "\n") and returns the data of each completed event. */
  class SSEParser {
    constructor() {
      this.buffer = "";
      this.data = [];
    }

    push(text) {
      this.buffer += text;
      const events = [];
      for (;;) {
        const m = /\r\n|\r|\n/.exec(this.buffer);
        if (!m) break;
        if (m[0] === "\r" && m.index === this.buffer.length - 1) break; // "\r\n" may be split
        const line = this.buffer.slice(0, m.index);
        this.buffer = this.buffer.slice(m.index + m[0].length);
        this.line(line, events);
      }
      return events;
    }

    /** End of the body: a last event without its blank line still counts. */
    end() {
      const events = [];
      if (this.buffer) this.line(this.buffer.replace(/\r$/, ""), events);
      this.buffer = "";
      this.line("", events);
      return events;
    }

    line(line, events) {
      if (line === "") {
        if (this.data.length) events.push(this.data.join("\n"));
        this.data = [];
        return;
      }
      if (line[0] === ":") return; // comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "data") this.data.push(value); // event:, id:, retry: unused here
    }
  }

  /* ---------- HTTP ---------- */

  class KioskError extends Error {}

  function url(path) {
    return config.api_base.replace(/\/+$/, "") + path;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (config.api_key) h.Authorization = "Bearer " + config.api_key;
    return h;
  }

  async function post(path, body, signal) {
    let res;
    try {
      res = await fetch(url(path), {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      setStatus("offline");
      throw new KioskError("The assistant can't be reached. Please try again in a moment.");
    }
    if (!res.ok) throw await httpError(res);
    return res;
  }

  async function httpError(res) {
    let detail = "";
    let code = null;
    try {
      const body = await res.json(); // OpenAI's shape: {"error": {"message", "type", "code"}}
      detail = (body.error && (body.error.message || body.error)) || body.detail || "";
      code = body.error && body.error.code;
    } catch (_) {
      /* not JSON */
    }
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    let text;
    if (res.status === 401 || res.status === 403) {
      text = "The assistant refused the page's API key (check config.json).";
    } else if (code === "loading") {
      setStatus("loading");
      text = "The assistant is still starting. Please try again in a moment.";
    } else if (res.status === 429 || res.status === 503) {
      text = "The assistant is busy. Please try again in a moment.";
    } else {
      text = "The assistant answered with an error.";
    }
    const err = new KioskError(`${text} (HTTP ${res.status}${detail ? ": " + detail : ""})`);
    err.status = res.status;
    return err;
  }

  /** POST a streaming chat completion; call onDelta(text) for each piece as it arrives. */
  async function streamChat(body, signal, onDelta) {
    const res = await post("/v1/chat/completions", body, signal);
    setStatus("ready");
    const type = res.headers.get("Content-Type") || "";
    if (!res.body || !type.includes("text/event-stream")) {
      const data = await res.json(); // a server that answered in one piece
      onDelta(data.choices[0].message.content || "");
      return data.choices[0].finish_reason;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder(); // stream mode: UTF-8 split across reads stays whole
    const parser = new SSEParser();
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      const events = done
        ? parser.push(decoder.decode()).concat(parser.end())
        : parser.push(decoder.decode(value, { stream: true }));
      for (const data of events) {
        if (signal.aborted) throw new DOMException("stopped", "AbortError"); // Stop, mid-read
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return finish;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          throw new KioskError("The assistant sent something this page cannot read.");
        }
        if (chunk.error) {
          throw new KioskError("The assistant stopped with an error: " + (chunk.error.message || chunk.error));
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue; // e.g. a usage-only chunk
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (done) throw new KioskError("The answer was cut off: the connection closed early.");
    }
  }

  /* ---------- FAQ search with the embedder (optional) ---------- */

  function unit(v) {
    let n = 0;
    for (const x of v) n += x * x;
    n = Math.sqrt(n) || 1;
    return v.map((x) => x / n);
  }

  async function embed(texts) {
    const vectors = [];
    for (let i = 0; i < texts.length; i += 256) { // the server takes 256 inputs a request
      const body = { input: texts.slice(i, i + 256) };
      if (config.embedding_model) body.model = config.embedding_model;
      const res = await post("/v1/embeddings", body);
      const data = (await res.json()).data.sort((a, b) => a.index - b.index);
      vectors.push(...data.map((d) => unit(d.embedding)));
    }
    return vectors;
  }

  async function prepareFaq() {
    const faq = config.faq.filter((f) => f && f.question && f.answer);
    config.faq = faq;
    ui.faq.replaceChildren();
    for (const item of faq.slice(0, config.faq_buttons)) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "btn btn-chip";
      b.textContent = item.question;
      b.addEventListener("click", () => answerFromFaq(item.question, item));
      ui.faq.appendChild(b);
    }
    ui.faq.hidden = faq.length === 0;
    if (!faq.length) return;
    try {
      faqVectors = await embed(faq.map((f) => f.question));
    } catch (err) {
      faqVectors = null; // no embedder served: the buttons still work, typed questions go to the model
      console.info("kiosk: FAQ search off (no /v1/embeddings):", err.message);
    }
  }

  /** The FAQ entry closest to `text`, if it is close enough; else null. */
  async function searchFaq(text, signal) {
    if (!faqVectors) return null;
    let q;
    try {
      const body = { input: [text] };
      if (config.embedding_model) body.model = config.embedding_model;
      const res = await post("/v1/embeddings", body, signal);
      q = unit((await res.json()).data[0].embedding);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      return null; // the model answers instead
    }
    let best = -2;
    let bestIndex = -1;
    faqVectors.forEach((v, i) => {
      let s = 0;
      for (let k = 0; k < v.length; k++) s += v[k] * q[k];
      if (s > best) [best, bestIndex] = [s, i];
    });
    return best >= config.faq_threshold ? config.faq[bestIndex] : null;
  }

  /* ---------- Conversation ---------- */

  function addMessage(role, text) {
    ui.welcome.hidden = true;
    const msg = document.createElement("div");
    msg.className = "msg msg-" + role;
    const who = document.createElement("span");
    who.className = "visually-hidden";
    who.textContent = role === "user" ? "You asked: " : "Answer: ";
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    msg.append(who, body);
    ui.conversation.appendChild(msg);
    scrollDown(true);
    return body;
  }

  function scrollDown(force) {
    const c = ui.conversation;
    if (force || c.scrollHeight - c.scrollTop - c.clientHeight < 80) c.scrollTop = c.scrollHeight;
  }

  function requestBody(messages) {
    const body = { messages, stream: true, max_tokens: config.max_tokens };
    if (config.temperature !== "" && config.temperature !== null) body.temperature = config.temperature;
    if (config.model) body.model = config.model;
    return body;
  }

  function messagesFor(question) {
    const turns = history.concat([{ role: "user", content: question }]);
    let recent = turns.slice(-Math.max(1, config.max_history_messages + 1));
    while (recent.length > 1 && recent[0].role !== "user") recent = recent.slice(1);
    const system = config.system_prompt ? [{ role: "system", content: config.system_prompt }] : [];
    return system.concat(recent);
  }

  function setBusy(busy) {
    ui.send.textContent = busy ? "Stop" : "Send";
    ui.send.classList.toggle("btn-stop", busy);
    ui.send.setAttribute("aria-label", busy ? "Stop the answer" : "Send");
    document.body.classList.toggle("busy", busy);
  }

  async function ask(text, retryOf) {
    text = text.trim();
    if (!text || current) return;
    hideError();
    const userEl = retryOf ? retryOf.userEl : addMessage("user", text);
    if (retryOf) retryOf.answerEl.parentElement.remove();
    const answerEl = addMessage("assistant", "");
    answerEl.setAttribute("aria-busy", "true");
    const controller = new AbortController();
    current = { controller, answerEl };
    setBusy(true);
    let answer = "";
    try {
      const hit = await searchFaq(text, controller.signal);
      if (hit) {
        answer = hit.answer;
        showFaqAnswer(answerEl, hit.answer);
      } else {
        const body = requestBody(messagesFor(text));
        kiosk.lastRequest = JSON.parse(JSON.stringify(body));
        await streamChat(body, controller.signal, (delta) => {
          answer += delta;
          answerEl.textContent = answer;
          lastActivity = Date.now();
          scrollDown(false);
          document.dispatchEvent(new CustomEvent("kiosk:delta", { detail: { text: answer } }));
        });
      }
      history.push({ role: "user", content: text }, { role: "assistant", content: answer });
      document.dispatchEvent(new CustomEvent("kiosk:done", { detail: { text: answer } }));
    } catch (err) {
      if (err.name === "AbortError") {
        if (answer) history.push({ role: "user", content: text }, { role: "assistant", content: answer });
        else if (answerEl.isConnected) answerEl.parentElement.remove();
      } else {
        answerEl.parentElement.classList.add("msg-failed");
        if (!answer) answerEl.textContent = "—";
        failed = { text, userEl, answerEl };
        showError(err instanceof KioskError ? err.message : "Something went wrong: " + err.message);
        document.dispatchEvent(new CustomEvent("kiosk:error", { detail: { message: err.message } }));
      }
    } finally {
      answerEl.removeAttribute("aria-busy");
      current = null;
      setBusy(false);
      lastActivity = Date.now();
    }
  }

  function showFaqAnswer(answerEl, text) {
    answerEl.textContent = text;
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = "From the FAQ";
    answerEl.parentElement.appendChild(tag);
    scrollDown(true);
  }

  function answerFromFaq(question, item) {
    if (current) return;
    hideError();
    addMessage("user", question);
    const answerEl = addMessage("assistant", "");
    showFaqAnswer(answerEl, item.answer);
    history.push({ role: "user", content: question }, { role: "assistant", content: item.answer });
    lastActivity = Date.now();
  }

  function reset() {
    if (current) current.controller.abort();
    current = null;
    failed = null;
    history = [];
    for (const el of ui.conversation.querySelectorAll(".msg")) el.remove();
    ui.welcome.hidden = false;
    ui.question.value = "";
    hideError();
    hideIdle();
    setBusy(false);
    ui.conversation.scrollTop = 0;
    lastActivity = Date.now();
    ui.question.focus();
    document.dispatchEvent(new CustomEvent("kiosk:reset"));
  }

  /* ---------- Errors and server status ---------- */

  function showError(text) {
    ui.errorText.textContent = text;
    ui.retry.hidden = !failed;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
    ui.errorText.textContent = "";
  }

  const STATUS = { ready: "Ready", loading: "Starting…", offline: "Offline" };

  function setStatus(state) {
    if (ui.status.dataset.state === state) return;
    ui.status.dataset.state = state;
    ui.status.textContent = STATUS[state];
  }

  async function checkHealth() {
    try {
      const res = await fetch(url("/health"), { cache: "no-store" });
      setStatus(res.ok ? "ready" : res.status === 503 ? "loading" : "offline");
    } catch (_) {
      setStatus("offline");
    }
  }

  /* ---------- Idle timeout: the next visitor starts afresh ---------- */

  function hideIdle() {
    if (ui.idle.hidden) return;
    ui.idle.hidden = true;
    ui.question.focus();
  }

  function tickIdle() {
    const inUse = history.length > 0 || ui.question.value !== "" || !ui.error.hidden || failed;
    if (!config.idle_timeout_s || !inUse || current) {
      if (!ui.idle.hidden) hideIdle();
      return;
    }
    const left = config.idle_timeout_s - (Date.now() - lastActivity) / 1000;
    if (left <= 0) {
      reset();
    } else if (left <= config.idle_warning_s) {
      ui.idleSeconds.textContent = String(Math.ceil(left));
      if (ui.idle.hidden) {
        ui.idle.hidden = false;
        ui.idleStay.focus();
      }
    } else if (!ui.idle.hidden) {
      hideIdle(); // a touch anywhere counts
    }
  }

  function activity() {
    lastActivity = Date.now();
  }

  /* ---------- Settings ---------- */

  async function loadConfig() {
    const params = new URLSearchParams(location.search);
    const file = params.get("config") || "config.json";
    const merged = Object.assign({}, DEFAULTS);
    try {
      const res = await fetch(file, { cache: "no-store" });
      if (res.ok) Object.assign(merged, await res.json());
      else if (res.status !== 404) throw new Error("HTTP " + res.status);
    } catch (err) {
      showError(`The page's settings (${file}) could not be read: ${err.message}. Using defaults.`);
    }
    for (const [key, value] of params) {
      if (!(key in DEFAULTS) || typeof DEFAULTS[key] === "object") continue;
      merged[key] = typeof DEFAULTS[key] === "number" ? Number(value) : value;
    }
    return merged;
  }

  async function start() {
    config = await loadConfig();
    document.title = config.title;
    ui.title.textContent = config.title;
    ui.welcome.textContent = config.welcome;
    kiosk.config = config;

    ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (current) {
        current.controller.abort();
        return;
      }
      const text = ui.question.value;
      ui.question.value = "";
      ask(text);
    });
    ui.reset.addEventListener("click", reset);
    ui.retry.addEventListener("click", () => {
      if (failed) {
        const f = failed;
        failed = null;
        ask(f.text, f);
      }
    });
    ui.idleStay.addEventListener("click", () => {
      activity();
      hideIdle();
    });
    for (const type of ["pointerdown", "keydown", "input", "wheel", "touchstart"]) {
      document.addEventListener(type, activity, { passive: true, capture: true });
    }
    setInterval(tickIdle, 1000);
    setInterval(checkHealth, 15000);

    await Promise.all([checkHealth(), prepareFaq()]);
    document.body.dataset.ready = "true";
    ui.question.focus();
  }

  const kiosk = { SSEParser, reset, ask, config, lastRequest: null };
  window.kiosk = kiosk;
  Object.defineProperty(kiosk, "history", { get: () => history });
  Object.defineProperty(kiosk, "faqSearch", { get: () => faqVectors !== null });
  start();
})();
