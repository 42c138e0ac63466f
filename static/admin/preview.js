/* Live preview chat on a bot's page: the tenant's own REST API with the session (members have the
   chat scope), answers streamed as Server-Sent Events over fetch. Model text only ever reaches the
   page through textContent. */
(function () {
  "use strict";
  var root = document.getElementById("preview");
  if (!root) return;
  var log = document.getElementById("preview-log");
  var form = document.getElementById("preview-form");
  var input = document.getElementById("preview-input");
  var button = form.querySelector("button");
  var botId = root.getAttribute("data-bot");
  var conversationId = null;

  function bubble(kind, text) {
    var element = document.createElement("div");
    element.className = "bubble " + kind;
    element.textContent = text || "";
    log.appendChild(element);
    log.scrollTop = log.scrollHeight;
    return element;
  }

  function meta(element, text) {
    var line = document.createElement("span");
    line.className = "meta";
    line.textContent = text;
    element.appendChild(line);
  }

  function reset() {
    conversationId = null;
    log.replaceChildren();
    var greeting = root.getAttribute("data-greeting");
    if (greeting) bubble("assistant", greeting);
  }

  function api(path, body, accept) {
    return fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": window.parleyCsrfToken(), Accept: accept || "application/json" },
      body: JSON.stringify(body),
    });
  }

  function errorText(response) {
    return response.json().then(
      function (body) { return (body && body.error && body.error.message) || "Request failed (" + response.status + ")."; },
      function () { return "Request failed (" + response.status + ")."; }
    );
  }

  function ensureConversation() {
    if (conversationId) return Promise.resolve(conversationId);
    return api("/api/v1/bots/" + encodeURIComponent(botId) + "/conversations/", { title: "Admin preview" }).then(function (response) {
      if (!response.ok) return errorText(response).then(function (text) { throw new Error(text); });
      return response.json().then(function (body) { conversationId = body.id; return conversationId; });
    });
  }

  function handle(state, type, data) {
    if (type === "token" && data && typeof data.text === "string") {
      state.text += data.text;
      state.answer.firstChild ? (state.answer.firstChild.nodeValue = state.text) : state.answer.appendChild(document.createTextNode(state.text));
      log.scrollTop = log.scrollHeight;
    } else if (type === "citation" && data) {
      state.citations.push("[" + (data.index || state.citations.length + 1) + "] " + (data.title || "source"));
    } else if (type === "done" && data) {
      var parts = [];
      if (data.provider) parts.push(data.provider + (data.model ? " · " + data.model : ""));
      if (typeof data.ttft_ms === "number") parts.push("TTFT " + Math.round(data.ttft_ms) + " ms");
      if (typeof data.total_ms === "number") parts.push("total " + Math.round(data.total_ms) + " ms");
      if (data.cached) parts.push("cache: " + data.cache_layer);
      if (state.citations.length) parts.push("sources: " + state.citations.join(", "));
      meta(state.answer, parts.join(" · "));
      state.finished = true;
    } else if (type === "error" && data) {
      bubble("error", data.message || "The answer failed.");
      state.finished = true;
    }
  }

  function readStream(response, state) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) return;
        buffer += decoder.decode(chunk.value, { stream: true });
        var boundary;
        while ((boundary = buffer.indexOf("\n\n")) !== -1) {
          var block = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          var type = "message", data = "";
          block.split("\n").forEach(function (line) {
            if (line.indexOf("event:") === 0) type = line.slice(6).trim();
            else if (line.indexOf("data:") === 0) data += line.slice(5).trim();
          });
          if (data) {
            try { handle(state, type, JSON.parse(data)); } catch (error) { /* a malformed event is skipped */ }
          }
          if (state.finished) { reader.cancel(); return; }
        }
        return pump();
      });
    }
    return pump();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var content = input.value.trim();
    if (!content) return;
    input.value = "";
    button.disabled = true;
    bubble("user", content);
    var state = { text: "", citations: [], finished: false, answer: null };
    ensureConversation()
      .then(function (id) {
        return api("/api/v1/conversations/" + encodeURIComponent(id) + "/messages/", { content: content }, "text/event-stream");
      })
      .then(function (response) {
        if (!response.ok) return errorText(response).then(function (text) { throw new Error(text); });
        state.answer = bubble("assistant", "");
        state.answer.setAttribute("aria-busy", "true");
        return readStream(response, state);
      })
      .catch(function (error) { bubble("error", error.message || "Something went wrong."); })
      .then(function () {
        if (state.answer) state.answer.removeAttribute("aria-busy");
        button.disabled = false;
        input.focus();
      });
  });

  document.getElementById("preview-reset").addEventListener("click", reset);
  reset();
})();
