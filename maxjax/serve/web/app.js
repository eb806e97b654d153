// The chat page: one conversation, kept in localStorage, streamed from /v1/chat/completions.
//
// A message goes: composer -> send() appends the user turn and an empty assistant turn -> POST with stream: true
// (through api(), which asks for the API key on 401 and tries again) -> readEvents() splits the SSE body into
// `data:` payloads -> each delta grows the assistant turn, re-rendered once per animation frame, while the live
// figures (TTFT, tok/s, tokens) are measured here in the page -> [DONE], Stop (AbortController) or an error ends
// it, and the turn is saved with its figures. The server's own figures come from GET /metrics every 3 s.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const { render, escapeHtml } = window.maxjaxMarkdown;

  const store = {
    get(key, fallback) {
      try {
        const value = localStorage.getItem("maxjax." + key);
        return value === null ? fallback : JSON.parse(value);
      } catch {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem("maxjax." + key, JSON.stringify(value));
      } catch { /* storage full or off: the page still works for this visit */ }
    },
    remove(key) {
      localStorage.removeItem("maxjax." + key);
    },
  };

  const SETTINGS = { system: "system-prompt", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };

  const state = {
    messages: store.get("messages", []), // {role, content, status?, error?, stats?}
    settings: Object.assign({ system: "", temperature: "", top_p: "", max_tokens: "" }, store.get("settings", {})),
    apiKey: store.get("apiKey", ""),
    model: null,
    controller: null, // the AbortController of the answer streaming now
  };

  // -- the API key -------------------------------------------------------------------------------------------

  let keyWaiters = [];

  function askKey(reason) {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("api-key").value = "";
    if (!dialog.open) dialog.showModal();
    $("api-key").focus();
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  function answerKey(key) {
    const dialog = $("key-dialog");
    if (dialog.open) dialog.close();
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve(key));
  }

  // fetch with the key; on 401, ask for a key and try again until it is accepted or the user cancels.
  async function api(path, init = {}) {
    for (;;) {
      const headers = Object.assign({}, init.headers);
      if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
      const response = await fetch(path, Object.assign({}, init, { headers }));
      if (response.status !== 401) return response;
      const key = await askKey(state.apiKey ? "The server did not accept this key: try another."
        : "This server asks for an API key.");
      if (key === null) return response;
      state.apiKey = key;
      store.set("apiKey", key);
    }
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch { /* not JSON */ }
    return `HTTP ${response.status} ${response.statusText}`;
  }

  // -- the model ---------------------------------------------------------------------------------------------

  async function loadModel() {
    try {
      const response = await api("/v1/models");
      if (response.status === 503) {
        $("model-name").textContent = "loading…";
        setTimeout(loadModel, 2000);
        return;
      }
      if (!response.ok) {
        $("model-name").textContent = await errorText(response);
        return;
      }
      const card = (await response.json()).data[0];
      state.model = card.id;
      $("model-name").textContent = card.id;
      $("model-name").title = `${card.id}: ${card.max_model_len} tokens of context`;
    } catch {
      $("model-name").textContent = "server unreachable";
      setTimeout(loadModel, 3000);
    }
  }

  // -- messages ----------------------------------------------------------------------------------------------

  function save() {
    store.set("messages", state.messages);
  }

  function statsText(message) {
    const s = message.stats || {};
    const parts = [];
    if (s.ttft != null) parts.push(`TTFT ${formatSeconds(s.ttft)}`);
    if (s.rate != null) parts.push(`${s.rate.toFixed(1)} tok/s`);
    if (s.tokens) parts.push(`${s.tokens} tokens`);
    if (message.status === "streaming") parts.push("streaming…");
    if (message.status === "stopped") parts.push("stopped");
    if (message.finish === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }

  function formatSeconds(seconds) {
    return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
  }

  function messageElement(message) {
    const el = document.createElement("div");
    el.className = `msg ${message.role}`;
    el.innerHTML = `<div class="role">${message.role === "user" ? "You" : "Assistant"}</div>` +
      `<div class="bubble"></div><div class="meta"></div>`;
    fillMessage(el, message);
    return el;
  }

  function fillMessage(el, message) {
    const bubble = el.querySelector(".bubble");
    if (message.role === "user") {
      bubble.textContent = message.content;
    } else {
      let html = render(message.content); // while streaming, style.css puts a cursor after its last text
      if (message.error) html += `<div class="error">${escapeHtml(message.error)}</div>`;
      bubble.innerHTML = html;
    }
    el.classList.toggle("streaming", message.status === "streaming");
    el.querySelector(".meta").textContent = message.role === "assistant" ? statsText(message) : "";
  }

  function renderAll() {
    const list = $("messages");
    list.querySelectorAll(".msg").forEach((el) => el.remove());
    for (const message of state.messages) list.appendChild(messageElement(message));
    $("empty").hidden = state.messages.length > 0;
    list.scrollTop = list.scrollHeight;
  }

  function nearBottom() {
    const list = $("messages");
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  // -- sending -----------------------------------------------------------------------------------------------

  function number(text, parse) {
    if (String(text).trim() === "") return undefined;
    const value = parse(text);
    return Number.isFinite(value) ? value : undefined;
  }

  function requestBody() {
    const messages = [];
    if (state.settings.system.trim()) messages.push({ role: "system", content: state.settings.system });
    for (const m of state.messages) {
      if (m.status === "streaming" || (m.role === "assistant" && !m.content)) continue;
      messages.push({ role: m.role, content: m.content });
    }
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model;
    const temperature = number(state.settings.temperature, parseFloat);
    const topP = number(state.settings.top_p, parseFloat);
    const maxTokens = number(state.settings.max_tokens, (t) => parseInt(t, 10));
    if (temperature !== undefined) body.temperature = temperature;
    if (topP !== undefined) body.top_p = topP;
    if (maxTokens !== undefined) body.max_tokens = maxTokens;
    return body;
  }

  // The `data:` payloads of an SSE body, one at a time, until [DONE] or the end of the body.
  async function readEvents(response, onData) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }

  function showLive(stats) {
    $("live-ttft").textContent = stats.ttft != null ? formatSeconds(stats.ttft) : "–";
    $("live-rate").textContent = stats.rate != null ? stats.rate.toFixed(1) : "–";
    $("live-tokens").textContent = stats.tokens ? String(stats.tokens) : "–";
  }

  async function send(text) {
    state.messages.push({ role: "user", content: text });
    const answer = { role: "assistant", content: "", status: "streaming", stats: {} };
    state.messages.push(answer);
    save();
    renderAll();
    const el = $("messages").lastElementChild;
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    // Figures of this answer: TTFT from the click to the first text; tok/s over the tokens after the first.
    const started = performance.now();
    let first = null;
    let counted = 0;
    let usageTokens = null;
    const measure = () => {
      const now = performance.now();
      const tokens = usageTokens ?? counted;
      answer.stats = {
        ttft: first === null ? null : (first - started) / 1000,
        rate: first !== null && tokens > 1 && now > first ? (tokens - 1) / ((now - first) / 1000) : null,
        tokens,
      };
      showLive(answer.stats);
    };
    let frame = 0;
    const repaint = () => {
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        const follow = nearBottom();
        fillMessage(el, answer);
        if (follow) $("messages").scrollTop = $("messages").scrollHeight;
      });
    };
    showLive({});

    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      await readEvents(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || "the server ended the answer with an error");
        if (chunk.usage) usageTokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        if (choice) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            if (first === null) first = performance.now();
            counted += 1;
            answer.content += piece;
          }
          if (choice.finish_reason) answer.finish = choice.finish_reason;
        }
        measure();
        repaint();
      });
      answer.status = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        answer.status = "stopped";
      } else {
        answer.status = "error";
        answer.error = err.message || String(err);
      }
    } finally {
      if (state.controller === controller) state.controller = null;
      measure();
      if (frame) cancelAnimationFrame(frame);
      fillMessage(el, answer);
      save();
      setBusy(false);
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // -- the server's figures ----------------------------------------------------------------------------------

  // Prometheus text: each series summed over its labels (enough for the unlabelled gauges and counters read here).
  function parseMetrics(text) {
    const out = {};
    for (const line of text.split("\n")) {
      const m = /^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)/.exec(line);
      if (m) out[m[1]] = (out[m[1]] || 0) + Number(m[2]);
    }
    return out;
  }

  let lastTokens = null;

  async function pollMetrics() {
    if (document.hidden) return;
    try {
      const response = await fetch("/metrics", { cache: "no-store" });
      if (!response.ok) return;
      const m = parseMetrics(await response.text());
      const now = performance.now();
      const show = (id, value) => { $(id).textContent = value; };
      show("m-running", fmt(m.maxjax_running_batch_size));
      show("m-queued", fmt(m.maxjax_queue_depth));
      const used = m.maxjax_kv_pages_in_use;
      const total = m.maxjax_kv_pages_total;
      show("m-kv", used === undefined ? "–" : total ? `${fmt(used)} / ${fmt(total)}` : fmt(used));
      const share = total ? Math.min(1, used / total) : 0;
      $("m-kv-bar").style.width = `${(share * 100).toFixed(1)}%`;
      const count = m.maxjax_time_to_first_token_seconds_count;
      show("m-ttft", count ? formatSeconds(m.maxjax_time_to_first_token_seconds_sum / count) : "–");
      const tokens = m.maxjax_generation_tokens_total;
      if (lastTokens && tokens !== undefined && now > lastTokens.at) {
        show("m-rate", ((tokens - lastTokens.tokens) / ((now - lastTokens.at) / 1000)).toFixed(1));
      }
      if (tokens !== undefined) lastTokens = { tokens, at: now };
      document.body.classList.remove("offline");
    } catch {
      document.body.classList.add("offline");
    }
  }

  function fmt(value) {
    return value === undefined || Number.isNaN(value) ? "–" : String(Math.round(value));
  }

  // -- wiring ------------------------------------------------------------------------------------------------

  function start() {
    for (const [key, id] of Object.entries(SETTINGS)) {
      const input = $(id);
      input.value = state.settings[key];
      input.addEventListener("input", () => {
        state.settings[key] = input.value;
        store.set("settings", state.settings);
      });
    }

    const prompt = $("prompt");
    const grow = () => {
      prompt.style.height = "auto";
      prompt.style.height = Math.min(prompt.scrollHeight, 240) + "px";
    };
    prompt.addEventListener("input", grow);
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text || state.controller) return;
      prompt.value = "";
      grow();
      send(text);
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      stop();
      state.messages = [];
      save();
      renderAll();
      showLive({});
      prompt.focus();
    });
    $("toggle-settings").addEventListener("click", () => document.body.classList.toggle("show-settings"));
    $("forget-key").addEventListener("click", () => {
      state.apiKey = "";
      store.remove("apiKey");
    });

    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (key) answerKey(key);
    });
    $("cancel-key").addEventListener("click", () => answerKey(null));
    $("key-dialog").addEventListener("cancel", () => answerKey(null));

    $("messages").addEventListener("click", (event) => {
      const button = event.target.closest(".copy");
      if (!button || !navigator.clipboard) return;
      const code = button.closest(".code-block").querySelector("code").textContent;
      navigator.clipboard.writeText(code).then(() => {
        button.textContent = "Copied";
        setTimeout(() => { button.textContent = "Copy"; }, 1200);
      });
    });

    // An answer left streaming by a closed tab ends as it was.
    for (const m of state.messages) if (m.status === "streaming") m.status = "stopped";
    renderAll();
    const last = state.messages[state.messages.length - 1];
    if (last && last.stats) showLive(last.stats);
    loadModel();
    pollMetrics();
    setInterval(pollMetrics, 3000);
    prompt.focus();
  }

  start();
})();
