// backlane dashboard: local times, confirmations, live regions and the live job page.
// No dependencies, no inline script anywhere (the pages' Content-Security-Policy forbids it).
(function () {
  "use strict";

  var TERMINAL = ["succeeded", "failed", "cancelled", "discarded"];

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) { el.textContent = when.toLocaleString(); }
    });
  }

  // Forms with data-confirm ask before they post.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });

  // Regions with data-refresh="N" are fetched again every N seconds while the tab is visible.
  function refresh(el, seconds) {
    window.setTimeout(function tick() {
      if (document.hidden || document.activeElement && el.contains(document.activeElement)) {
        window.setTimeout(tick, seconds * 1000);
        return;
      }
      fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html) {
            var doc = new DOMParser().parseFromString(html, "text/html");
            var fresh = doc.getElementById(el.id);
            if (fresh) {
              el.replaceChildren.apply(el, Array.from(fresh.childNodes).map(function (n) {
                return document.importNode(n, true);
              }));
              localTimes(el);
            }
          }
        })
        .catch(function () {})
        .then(function () { window.setTimeout(tick, seconds * 1000); });
    }, seconds * 1000);
  }

  // The job page follows its job over server-sent events, then reloads once it ended.
  function follow(section) {
    var state = section.getAttribute("data-state");
    if (TERMINAL.indexOf(state) >= 0 || !window.EventSource) { return; }
    var bar = document.getElementById("progress");
    var badge = section.querySelector("[data-field=state] .badge");
    var percent = section.querySelector("[data-field=percent]");
    var message = section.querySelector("[data-field=message]");
    var attempts = section.querySelector("[data-field=attempts]");
    var source = new EventSource(section.getAttribute("data-events"));
    source.onmessage = function (event) {
      var job = JSON.parse(event.data);
      badge.textContent = job.state;
      badge.className = "badge state-" + job.state;
      section.setAttribute("data-state", job.state);
      attempts.textContent = String(job.attempts);
      message.textContent = job.message || "";
      if (job.progress !== null && job.progress !== undefined) {
        bar.value = job.progress;
        percent.textContent = Math.round(job.progress * 100) + "%";
      } else if (job.state === "succeeded") {
        bar.value = 1;
      }
      if (TERMINAL.indexOf(job.state) >= 0) {
        source.close();
        window.setTimeout(function () { window.location.reload(); }, 300);
      }
    };
    source.addEventListener("gone", function () {
      source.close();
      badge.textContent = "deleted";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      refresh(el, Number(el.getAttribute("data-refresh")) || 5);
    });
    var job = document.querySelector("[data-events]");
    if (job) { follow(job); }
  });
})();
