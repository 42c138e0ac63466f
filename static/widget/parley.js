/*! Parley chat widget: <script src="https://.../static/widget/parley.js" data-bot="PUBLIC_ID" async></script>
 *
 * Optional: data-user-id + data-user-hash (identity verification: hex HMAC-SHA256 of the user id
 * under the bot's identity secret, computed by your backend), or ParleyWidget.identify(id, hash).
 *
 * Vanilla JS, no build step. Everything renders inside a Shadow DOM. Model text only ever reaches
 * the page as text nodes (a tiny Markdown renderer builds elements; links only http/https/mailto).
 * Stored in localStorage: the anonymous visitor id and the current conversation id, nothing else.
 */
(function () {
  "use strict";

  var script = document.currentScript || document.querySelector("script[data-bot][src*='parley']");
  if (!script || window.ParleyWidget) return;
  var botId = script.getAttribute("data-bot") || "";
  var api = new URL(script.src, location.href).origin + "/api/v1/widget/bots/" + encodeURIComponent(botId) + "/";
  var storeKey = "parley:" + botId + ":";
  var identity = { userId: script.getAttribute("data-user-id") || "", userHash: script.getAttribute("data-user-hash") || "" };
  var COLOR = /^#(?:[0-9a-f]{3}|[0-9a-f]{6})$/i;
  var THUMB = "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6c-.4.3-.6.8-.6 1.4v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1c.1-.2.2-.5.2-.7v-2z";
  var RESUME_DELAYS = [250, 500, 1000, 2000, 4000, 8000, 8000];

  var session = null; // {token, expiresAt, bot}
  var sessionError = null; // a refusal to show (origin not allowed, unknown bot, ...)
  var sessionPromise = null;
  var conversationId = load("conversation");
  var historyLoaded = false;
  var turn = null; // the answer being streamed: {generationId, lastEventId, controller, view, ...}

  // --- storage (may be blocked: the widget then works for this page view only) -------------------

  function load(name) {
    try {
      return localStorage.getItem(storeKey + name) || "";
    } catch (e) {
      return "";
    }
  }

  function save(name, value) {
    try {
      if (value) localStorage.setItem(storeKey + name, value);
      else localStorage.removeItem(storeKey + name);
    } catch (e) {
      /* storage blocked */
    }
  }

  function visitorId() {
    var id = load("visitor");
    if (!/^[A-Za-z0-9_-]{8,64}$/.test(id)) {
      var bytes = new Uint8Array(16);
      crypto.getRandomValues(bytes);
      id = "v_" + Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
      save("visitor", id);
    }
    return id;
  }

  // --- HTTP ----------------------------------------------------------------------------------------

  function ApiError(status, body, response) {
    var error = (body && body.error) || {};
    this.status = status;
    this.code = error.code || "";
    this.message = error.message || "The chat service could not be reached.";
    this.retryAfter = response ? parseInt(response.headers.get("Retry-After") || "0", 10) : 0;
  }

  function failure(response) {
    return response.json().then(
      function (body) { throw new ApiError(response.status, body, response); },
      function () { throw new ApiError(response.status, null, response); }
    );
  }

  function startSession() {
    var body = { visitor_id: visitorId() };
    if (identity.userId) {
      body.user_id = identity.userId;
      body.user_hash = identity.userHash;
    }
    // text/plain keeps this first call a CORS simple request: no preflight round trip.
    sessionPromise = fetch(api + "session/", {
      method: "POST",
      headers: { "Content-Type": "text/plain;charset=UTF-8" },
      body: JSON.stringify(body),
    })
      .then(function (response) { return response.ok ? response.json() : failure(response); })
      .then(function (data) {
        session = { token: data.token, expiresAt: Date.parse(data.expires_at), bot: data.bot };
        sessionError = null;
        applyBot(data.bot);
        return session;
      })
      .catch(function (error) {
        sessionPromise = null;
        sessionError = error instanceof ApiError ? error : new ApiError(0, null, null);
        throw sessionError;
      });
    return sessionPromise;
  }

  function ensureSession() {
    if (session && session.expiresAt - Date.now() > 30000) return Promise.resolve(session);
    if (sessionPromise && !session) return sessionPromise;
    session = null;
    return startSession();
  }

  // A call with the visitor token; a 401 (token expired or revoked) gets one fresh token.
  function call(path, options, isRetry) {
    return ensureSession().then(function (current) {
      var headers = Object.assign({ Authorization: "Bearer " + current.token }, options.headers || {});
      return fetch(api + path, Object.assign({}, options, { headers: headers })).then(function (response) {
        if (response.status === 401 && !isRetry) {
          session = null;
          return call(path, options, true);
        }
        return response.ok ? response : failure(response);
      });
    });
  }

  function json(path, method, body) {
    return call(path, {
      method: method,
      headers: { "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : undefined,
    }).then(function (response) { return response.json(); });
  }

  // --- Server-Sent Events over fetch ---------------------------------------------------------------

  function readEvents(response, onEvent) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var event = { id: "", type: "", data: [] };
    function line(text) {
      if (text === "") {
        if (event.data.length) onEvent(event.id, event.type || "message", event.data.join("\n"));
        event = { id: "", type: "", data: [] };
        return;
      }
      if (text.charAt(0) === ":") return;
      var colon = text.indexOf(":");
      var field = colon < 0 ? text : text.slice(0, colon);
      var value = colon < 0 ? "" : text.slice(colon + 1).replace(/^ /, "");
      if (field === "id") event.id = value;
      else if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
    }
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) return;
        buffer += decoder.decode(chunk.value, { stream: true });
        var lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        lines.forEach(line);
        return pump();
      });
    }
    return pump();
  }

  // --- safe Markdown -------------------------------------------------------------------------------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function safeHref(href) {
    try {
      var url = new URL(href);
      return /^(https?|mailto):$/.test(url.protocol) ? url.href : null;
    } catch (e) {
      return null; // relative, javascript:, data:, ... stay text
    }
  }

  var INLINE = [
    ["code", /`([^`\n]+)`/],
    ["link", /\[([^\]\n]+)\]\(([^()\s]+)\)/],
    ["cite", /\[(\d{1,2})\]/],
    ["strong", /\*\*(\S(?:[^*\n]*\S)?)\*\*/],
    ["em", /\*(\S(?:[^*\n]*\S)?)\*/],
  ];

  function inline(parent, text, cite) {
    while (text) {
      var best = null;
      INLINE.forEach(function (rule) {
        var match = rule[1].exec(text);
        if (match && (!best || match.index < best.match.index)) best = { kind: rule[0], match: match };
      });
      if (!best) {
        parent.appendChild(document.createTextNode(text));
        return;
      }
      var m = best.match;
      if (m.index) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
      if (best.kind === "code") parent.appendChild(el("code", "", m[1]));
      else if (best.kind === "link") {
        var href = safeHref(m[2]);
        if (href) {
          var a = el("a", "", m[1]);
          a.href = href;
          a.target = "_blank";
          a.rel = "noopener noreferrer nofollow";
          parent.appendChild(a);
        } else parent.appendChild(document.createTextNode(m[1]));
      } else if (best.kind === "cite") parent.appendChild(cite(m[1]));
      else {
        var node = el(best.kind);
        inline(node, m[1], cite);
        parent.appendChild(node);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function markdown(text, cite) {
    var root = document.createDocumentFragment();
    var lines = text.split("\n");
    var paragraph = null;
    var list = null;
    for (var i = 0; i < lines.length; i++) {
      var ln = lines[i];
      if (/^```/.test(ln)) {
        var code = [];
        for (i++; i < lines.length && !/^```/.test(lines[i]); i++) code.push(lines[i]);
        root.appendChild(el("pre")).appendChild(el("code", "", code.join("\n")));
        paragraph = list = null;
        continue;
      }
      var item = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/.exec(ln);
      if (item) {
        var kind = item[1] ? "ul" : "ol";
        if (!list || list.tagName.toLowerCase() !== kind) list = root.appendChild(el(kind));
        inline(list.appendChild(el("li")), item[3], cite);
        paragraph = null;
        continue;
      }
      if (!ln.trim()) {
        paragraph = list = null;
        continue;
      }
      var quote = /^>\s?(.*)$/.exec(ln);
      if (quote) {
        if (!paragraph || paragraph.parentNode.tagName !== "BLOCKQUOTE") {
          paragraph = root.appendChild(el("blockquote")).appendChild(el("p"));
        } else paragraph.appendChild(el("br"));
        list = null;
        inline(paragraph, quote[1], cite);
        continue;
      }
      if (paragraph && paragraph.parentNode.tagName === "BLOCKQUOTE") paragraph = null;
      var heading = /^#{1,6}\s+(.*)$/.exec(ln);
      if (heading) {
        inline(root.appendChild(el("p", "heading")).appendChild(el("strong")), heading[1], cite);
        paragraph = list = null;
        continue;
      }
      if (paragraph) paragraph.appendChild(el("br"));
      else paragraph = root.appendChild(el("p"));
      list = null;
      inline(paragraph, ln, cite);
    }
    return root;
  }

  // --- the interface -------------------------------------------------------------------------------

  var CSS =
    ":host{all:initial}" +
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}" +
    ".launcher{position:fixed;bottom:20px;right:20px;z-index:2147483000;width:56px;height:56px;border-radius:50%;border:0;" +
    "background:var(--p-primary);color:var(--p-text);cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);display:flex;align-items:center;justify-content:center}" +
    ".left .launcher,.left .panel{right:auto;left:20px}" +
    ".launcher svg{width:28px;height:28px;fill:currentColor}" +
    "button:focus-visible,textarea:focus-visible,a:focus-visible{outline:3px solid #1a73e8;outline-offset:2px}" +
    ".panel{position:fixed;bottom:88px;right:20px;z-index:2147483000;width:370px;max-width:calc(100vw - 40px);height:560px;max-height:calc(100vh - 110px);" +
    "display:flex;flex-direction:column;background:#fff;color:#1d1d1f;border-radius:14px;box-shadow:0 10px 40px rgba(0,0,0,.25);overflow:hidden;font-size:15px;line-height:1.45}" +
    ".panel[hidden]{display:none}" +
    "header{display:flex;align-items:center;gap:8px;padding:12px 14px;background:var(--p-primary);color:var(--p-text)}" +
    "header h2{flex:1;margin:0;font-size:16px;font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}" +
    "header button{background:transparent;border:1px solid currentColor;color:inherit;border-radius:8px;padding:4px 8px;cursor:pointer;font-size:13px}" +
    ".log{flex:1;overflow-y:auto;padding:14px;display:flex;flex-direction:column;gap:10px}" +
    ".msg{max-width:88%;padding:9px 12px;border-radius:12px;word-wrap:break-word;overflow-wrap:anywhere}" +
    ".msg p{margin:0 0 6px}.msg p:last-child{margin-bottom:0}.msg ul,.msg ol{margin:4px 0;padding-left:20px}" +
    ".msg pre{background:#f3f3f5;padding:8px;border-radius:6px;overflow-x:auto}.msg code{font-family:ui-monospace,monospace;font-size:13px}" +
    ".user{align-self:flex-end;background:var(--p-primary);color:var(--p-text);white-space:pre-wrap}" +
    ".assistant{align-self:flex-start;background:#f1f2f6}" +
    ".assistant a{color:#1a4fd0}" +
    ".cite{border:0;background:none;color:#1a4fd0;cursor:pointer;padding:0 1px;font-size:11px;vertical-align:super}" +
    ".sources{margin:8px 0 0;padding:6px 0 0 18px;border-top:1px solid #dcdde3;font-size:12px;color:#4a4a55}" +
    ".sources li:focus{outline:2px solid #1a73e8}" +
    ".tools{display:flex;gap:4px;margin-top:6px}" +
    ".tools button{border:1px solid #c9cad3;background:#fff;color:#4a4a55;border-radius:6px;cursor:pointer;padding:3px 6px;line-height:0}" +
    ".tools svg{width:15px;height:15px;fill:currentColor}" +
    ".msg blockquote{margin:4px 0;padding-left:10px;border-left:3px solid #c9cad3}" +
    ".tools button[aria-pressed=true]{background:#e3e8fb;border-color:#3457d5}" +
    ".typing::after{content:'\\2026';animation:blink 1s infinite}@keyframes blink{50%{opacity:.2}}" +
    ".alert{margin:0 14px 8px;padding:8px 10px;border-radius:8px;background:#fdecea;color:#8a1c12;font-size:14px;display:flex;gap:8px;align-items:center}" +
    ".alert[hidden]{display:none}.alert span{flex:1}" +
    ".alert button{border:1px solid #8a1c12;background:#fff;color:#8a1c12;border-radius:6px;cursor:pointer;padding:2px 8px}" +
    "form{display:flex;gap:8px;padding:10px;border-top:1px solid #e4e5ea}" +
    "textarea{flex:1;resize:none;border:1px solid #c9cad3;border-radius:10px;padding:8px 10px;font-size:15px;min-height:40px;max-height:120px}" +
    "form button{border:0;border-radius:10px;padding:0 14px;background:var(--p-primary);color:var(--p-text);cursor:pointer;font-size:14px}" +
    "form button[hidden]{display:none}form button:disabled{opacity:.5;cursor:default}" +
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}" +
    "@media (max-width:480px){.frame .panel{top:0;left:0;right:0;bottom:0;width:100%;max-width:none;height:100%;max-height:none;border-radius:0}}" +
    "@media (prefers-reduced-motion:reduce){.typing::after{animation:none}}";

  var host = el("div");
  host.id = "parley-widget";
  var shadow = host.attachShadow({ mode: "open" });
  shadow.appendChild(el("style", "", CSS));
  var frame = shadow.appendChild(el("div", "frame"));

  var launcher = frame.appendChild(el("button", "launcher"));
  launcher.type = "button";
  launcher.setAttribute("aria-label", "Open chat");
  launcher.setAttribute("aria-expanded", "false");
  launcher.setAttribute("aria-controls", "parley-panel");
  launcher.appendChild(icon("M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z"));

  var panel = frame.appendChild(el("div", "panel"));
  panel.id = "parley-panel";
  panel.hidden = true;
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-labelledby", "parley-title");
  var header = panel.appendChild(el("header"));
  var title = header.appendChild(el("h2", "", "Chat"));
  title.id = "parley-title";
  var newButton = header.appendChild(el("button", "", "New conversation"));
  newButton.type = "button";
  var closeButton = header.appendChild(el("button", "", "\u2715"));
  closeButton.type = "button";
  closeButton.setAttribute("aria-label", "Minimise chat");

  var log = panel.appendChild(el("div", "log"));
  log.setAttribute("role", "log");
  log.setAttribute("aria-label", "Conversation");
  log.setAttribute("aria-live", "off"); // answers are announced once complete, by `live`
  log.tabIndex = 0;
  var live = panel.appendChild(el("div", "sr"));
  live.setAttribute("aria-live", "polite");
  var alertBox = panel.appendChild(el("div", "alert"));
  alertBox.setAttribute("role", "alert");
  alertBox.hidden = true;
  var alertText = alertBox.appendChild(el("span"));
  var retryButton = alertBox.appendChild(el("button", "", "Retry"));
  retryButton.type = "button";

  var form = panel.appendChild(el("form"));
  var label = form.appendChild(el("label", "sr", "Message"));
  label.htmlFor = "parley-input";
  var input = form.appendChild(el("textarea"));
  input.id = "parley-input";
  input.rows = 1;
  input.maxLength = 4000;
  input.placeholder = "Type your question\u2026";
  var sendButton = form.appendChild(el("button", "", "Send"));
  sendButton.type = "submit";
  var stopButton = form.appendChild(el("button", "", "Stop"));
  stopButton.type = "button";
  stopButton.hidden = true;

  function icon(d, flip) {
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    if (flip) svg.setAttribute("transform", "rotate(180)");
    var path = svg.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "path"));
    path.setAttribute("d", d);
    return svg;
  }

  function applyBot(bot) {
    var theme = bot.theme || {};
    host.style.setProperty("--p-primary", COLOR.test(theme.primary_color) ? theme.primary_color : "#3457d5");
    host.style.setProperty("--p-text", COLOR.test(theme.text_color) ? theme.text_color : "#ffffff");
    frame.className = "frame " + (theme.position === "left" ? "left" : "right");
    title.textContent = bot.name || "Chat";
  }
  applyBot({});

  function scrollDown() {
    log.scrollTop = log.scrollHeight;
  }

  function showAlert(message, retry) {
    alertText.textContent = message;
    retryButton.hidden = !retry;
    retryButton.onclick = retry || null;
    alertBox.hidden = false;
  }

  function hideAlert() {
    alertBox.hidden = true;
  }

  function friendly(error) {
    if (error.status === 429) {
      var seconds = error.retryAfter || 10;
      return "You're sending messages too quickly \u2014 try again in " + seconds + " s.";
    }
    if (error.status === 402) return "This assistant has reached its usage limit for now. Please try again later.";
    if (error.status === 0) return "The chat service could not be reached. Check your connection.";
    return error.message;
  }

  function setStreaming(on) {
    sendButton.disabled = on;
    stopButton.hidden = !on;
  }

  // One message in the log. Assistant text is re-rendered from its Markdown as tokens arrive.
  function messageView(role, text) {
    var node = log.appendChild(el("div", "msg " + role));
    var body = node.appendChild(el("div", "body"));
    var view = { node: node, body: body, text: text || "", citations: {}, sources: null, key: Math.random().toString(36).slice(2) };
    view.render = function () {
      if (role === "user") {
        body.textContent = view.text;
        return;
      }
      body.textContent = "";
      body.appendChild(markdown(view.text, function (n) { return citeButton(view, n); }));
    };
    view.render();
    scrollDown();
    return view;
  }

  function citeButton(view, n) {
    var button = el("button", "cite", "[" + n + "]");
    button.type = "button";
    var source = view.citations[n];
    button.setAttribute("aria-label", "Source " + n + (source ? ": " + source.title : ""));
    button.onclick = function () {
      var item = view.sources && view.sources.querySelector("[data-n='" + n + "']");
      if (item) {
        item.scrollIntoView({ block: "nearest" });
        item.focus();
      }
    };
    return button;
  }

  function addCitation(view, citation) {
    if (!citation || view.citations[citation.index]) return;
    view.citations[citation.index] = citation;
    if (!view.sources) {
      view.sources = view.node.appendChild(el("ol", "sources"));
      view.sources.setAttribute("aria-label", "Sources");
    }
    var item = el("li", "", citation.title + (citation.page ? ", p. " + citation.page : ""));
    item.value = citation.index;
    item.setAttribute("data-n", String(citation.index));
    item.tabIndex = -1;
    if (citation.quote) item.title = citation.quote;
    var items = view.sources.children;
    var before = null;
    for (var i = 0; i < items.length; i++) {
      if (+items[i].getAttribute("data-n") > citation.index) {
        before = items[i];
        break;
      }
    }
    view.sources.insertBefore(item, before);
  }

  function addFeedback(view, messageId, current) {
    if (!messageId || !conversationId) return;
    var tools = view.node.appendChild(el("div", "tools"));
    var conversation = conversationId;
    [["up", false, "Helpful"], ["down", true, "Not helpful"]].forEach(function (spec) {
      var button = tools.appendChild(el("button"));
      button.appendChild(icon(THUMB, spec[1]));
      button.type = "button";
      button.setAttribute("aria-label", spec[2]);
      button.setAttribute("aria-pressed", String(current === spec[0]));
      button.onclick = function () {
        var verdict = button.getAttribute("aria-pressed") === "true" ? "" : spec[0];
        json("conversations/" + conversation + "/messages/" + messageId + "/feedback/", "POST", { verdict: verdict })
          .then(function (data) {
            Array.prototype.forEach.call(tools.children, function (other, index) {
              other.setAttribute("aria-pressed", String(data.feedback === ["up", "down"][index]));
            });
          })
          .catch(function (error) { showAlert(friendly(error)); });
      };
    });
  }

  function showGreeting() {
    var greeting = session && session.bot && session.bot.greeting;
    if (greeting) messageView("assistant greeting", greeting);
  }

  function loadHistory() {
    historyLoaded = true;
    log.textContent = "";
    if (!conversationId) {
      showGreeting();
      return Promise.resolve();
    }
    return json("conversations/" + conversationId + "/messages/", "GET")
      .then(function (data) {
        showGreeting();
        data.data.forEach(function (message) {
          if (message.role !== "user" && message.role !== "assistant") return;
          var view = messageView(message.role, message.content);
          (message.citations || []).forEach(function (citation) { addCitation(view, citation); });
          view.render();
          if (message.role === "assistant") addFeedback(view, message.id, message.feedback);
        });
      })
      .catch(function (error) {
        if (error.status === 404) {
          conversationId = "";
          save("conversation", "");
          showGreeting();
          return;
        }
        throw error;
      });
  }

  function ensureConversation() {
    if (conversationId) return Promise.resolve(conversationId);
    return json("conversations/", "POST", {}).then(function (data) {
      conversationId = data.id;
      save("conversation", conversationId);
      return conversationId;
    });
  }

  // --- a turn: POST and stream, resume after a drop, stop, retry -----------------------------------

  function send(content) {
    if (turn || !content.trim()) return;
    hideAlert();
    var userView = messageView("user", content);
    var view = messageView("assistant", "");
    view.body.classList.add("typing");
    turn = { view: view, generationId: "", lastEventId: "", ended: false, controller: new AbortController(), content: content };
    var current = turn;
    setStreaming(true);
    ensureConversation()
      .then(function (id) {
        return call("conversations/" + id + "/messages/", {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify({ content: content }),
          signal: current.controller.signal,
        });
      })
      .then(function (response) {
        current.generationId = response.headers.get("X-Parley-Generation-Id") || "";
        return follow(current, response);
      })
      .catch(function (error) {
        if (current.generationId && !(error instanceof ApiError)) return resume(current, 0);
        fail(current, error, userView);
      });
  }

  function follow(current, response) {
    return readEvents(response, function (id, type, data) { handle(current, id, type, data); }).then(function () {
      if (!current.ended) return resume(current, 0); // the stream closed before the answer ended
    });
  }

  function handle(current, id, type, raw) {
    if (current !== turn || current.ended) return;
    if (id) current.lastEventId = id;
    var data = {};
    try {
      data = JSON.parse(raw);
    } catch (e) {
      return;
    }
    var view = current.view;
    if (type === "message.created") current.generationId = data.generation_id || current.generationId;
    else if (type === "token") {
      view.body.classList.remove("typing");
      view.text += data.text || "";
      scheduleRender(view);
    } else if (type === "citation") {
      addCitation(view, data);
      scheduleRender(view);
    } else if (type === "done") {
      finish(current);
      view.render();
      addFeedback(view, data.message_id, "");
      live.textContent = view.text;
    } else if (type === "error") {
      finish(current);
      view.render();
      if (!view.text) view.node.remove();
      showAlert(data.message || "Something went wrong.", function () { send(current.content); });
    }
  }

  function scheduleRender(view) {
    if (view.pending) return;
    view.pending = true;
    requestAnimationFrame(function () {
      view.pending = false;
      view.render();
      scrollDown();
    });
  }

  function finish(current) {
    current.ended = true;
    current.view.body.classList.remove("typing");
    if (turn === current) turn = null;
    setStreaming(false);
  }

  // After a network drop: wait (backoff, or until the browser is back online), then follow the
  // generation from the last event received. The server replays only what came after it.
  function resume(current, attempt) {
    if (current.ended || current !== turn) return;
    if (attempt >= RESUME_DELAYS.length) {
      finish(current);
      showAlert("The connection was lost before the answer finished.", function () { send(current.content); });
      return;
    }
    return new Promise(function (resolve) {
      var timer = setTimeout(done, RESUME_DELAYS[attempt]);
      function done() {
        clearTimeout(timer);
        window.removeEventListener("online", done);
        resolve();
      }
      window.addEventListener("online", done);
    })
      .then(function () {
        if (current.ended || current !== turn) return;
        current.controller = new AbortController();
        return call("generations/" + current.generationId + "/events/", {
          headers: current.lastEventId ? { "Last-Event-ID": current.lastEventId } : {},
          signal: current.controller.signal,
        }).then(function (response) { return follow(current, response); });
      })
      .catch(function (error) {
        if (current.ended || current !== turn) return;
        if (error instanceof ApiError && error.status !== 401 && error.status < 500) {
          finish(current);
          showAlert(friendly(error), function () { send(current.content); });
          return;
        }
        return resume(current, attempt + 1);
      });
  }

  function fail(current, error, userView) {
    finish(current);
    current.view.node.remove();
    if (error && error.name === "AbortError") return;
    if (!(error instanceof ApiError)) error = new ApiError(0, null, null);
    if (error.status === 404 && error.code === "not_found") {
      conversationId = ""; // the conversation expired: the retry starts a new one
      save("conversation", "");
    }
    userView.node.classList.add("failed");
    showAlert(friendly(error), function () {
      userView.node.remove();
      send(current.content);
    });
  }

  function stop() {
    var current = turn;
    if (!current || !current.generationId) return;
    stopButton.disabled = true;
    json("generations/" + current.generationId + "/cancel/", "POST")
      .catch(function (error) { showAlert(friendly(error)); })
      .then(function () { stopButton.disabled = false; });
  }

  function newConversation() {
    if (turn) {
      turn.controller.abort();
      finish(turn);
    }
    conversationId = "";
    save("conversation", "");
    hideAlert();
    log.textContent = "";
    showGreeting();
    input.focus();
  }

  // --- opening, closing, keyboard -----------------------------------------------------------------

  function open() {
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    launcher.setAttribute("aria-label", "Close chat");
    input.focus();
    if (historyLoaded) return;
    ensureSession()
      .then(function () {
        setEnabled(true);
        return loadHistory();
      })
      .catch(function (error) {
        historyLoaded = false;
        setEnabled(!sessionError || sessionError.status === 0 || sessionError.status === 429);
        showAlert(friendly(error), function () {
          hideAlert();
          open();
        });
      });
  }

  function close() {
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-label", "Open chat");
    launcher.focus();
  }

  function setEnabled(on) {
    input.disabled = !on;
    sendButton.disabled = !on || !!turn;
  }

  launcher.addEventListener("click", function () {
    if (panel.hidden) open();
    else close();
  });
  closeButton.addEventListener("click", close);
  newButton.addEventListener("click", newConversation);
  stopButton.addEventListener("click", stop);
  panel.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      event.stopPropagation();
      close();
    }
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var content = input.value;
    if (!content.trim() || turn) return;
    input.value = "";
    send(content);
  });

  function mount() {
    document.body.appendChild(host);
    ensureSession().catch(function () {
      /* shown when the panel opens */
    });
  }

  window.ParleyWidget = {
    open: open,
    close: close,
    newConversation: newConversation,
    // Identity verification for a signed-in user of your site (see the README's Widget section).
    identify: function (userId, userHash) {
      identity = { userId: userId || "", userHash: userHash || "" };
      session = null;
      sessionPromise = null;
      historyLoaded = false;
      conversationId = "";
      save("conversation", "");
      if (!panel.hidden) open();
    },
  };

  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
