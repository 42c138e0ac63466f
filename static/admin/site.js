/* Parley admin site: small progressive enhancements. Every page works without this file. */
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }
  window.parleyCsrfToken = csrfToken;

  /* Copy buttons: <button data-copy="element-id">. */
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) return;
    var text = source.value !== undefined && source.tagName !== "PRE" && source.tagName !== "CODE" ? source.value : source.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      button.setAttribute("aria-live", "polite");
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallbackCopy(text); done(); });
    } else {
      fallbackCopy(text);
      done();
    }
  });

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "absolute";
    area.style.left = "-9999px";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (error) { /* nothing more to try */ }
    document.body.removeChild(area);
  }

  /* Confirmations: <form data-confirm="Delete this?">. Confirmation pages exist for no-JS users. */
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });

  /* Drag and drop onto .dropzone: the files go into its file input, and the form is submitted. */
  document.querySelectorAll(".dropzone").forEach(function (zone) {
    var input = zone.querySelector('input[type="file"]');
    if (!input) return;
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("dragging"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
    });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      if (!event.dataTransfer || !event.dataTransfer.files.length) return;
      input.files = event.dataTransfer.files;
      zone.closest("form").requestSubmit();
    });
  });

  /* Live fragments: <div data-poll="url" data-poll-while="selector">: while the fragment holds an
     element matching the selector (a document still queued or processing), fetch it again. */
  document.querySelectorAll("[data-poll]").forEach(function (region) {
    var url = region.getAttribute("data-poll");
    var busy = region.getAttribute("data-poll-while");
    var interval = parseInt(region.getAttribute("data-poll-ms") || "1500", 10);
    function tick() {
      if (!region.querySelector(busy)) return;
      fetch(url, { headers: { "X-Requested-With": "fetch" }, credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
        .then(function (html) {
          // The fragment is our own server-rendered, auto-escaped template.
          var fresh = new DOMParser().parseFromString(html, "text/html").body;
          region.replaceChildren.apply(region, Array.prototype.slice.call(fresh.childNodes));
          setTimeout(tick, interval);
        })
        .catch(function () { setTimeout(tick, interval * 3); });
    }
    setTimeout(tick, interval);
  });
})();
