// natflow console: relative times, live patches over server-sent events, JSON checks on forms.
// Plain JavaScript with no dependencies, served from the package (no network needed).
(function () {
  "use strict";

  function relative(date) {
    var seconds = (Date.now() - date.getTime()) / 1000;
    var ahead = seconds < 0;
    seconds = Math.abs(seconds);
    if (seconds < 1) return ahead ? "in a moment" : "just now";
    var units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) {
        var amount = Math.floor(seconds / units[i][1]) + " " + units[i][0];
        return ahead ? "in " + amount : amount + " ago";
      }
    }
    return "just now";
  }

  // Times are sent in UTC; the header's zone button shows them in the browser's zone instead.
  function localZone() { return localStorage.getItem("natflowZone") === "local"; }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function clock(date, local, withDate) {
    var y = local ? date.getFullYear() : date.getUTCFullYear();
    var mo = local ? date.getMonth() : date.getUTCMonth();
    var d = local ? date.getDate() : date.getUTCDate();
    var h = local ? date.getHours() : date.getUTCHours();
    var mi = local ? date.getMinutes() : date.getUTCMinutes();
    var s = local ? date.getSeconds() : date.getUTCSeconds();
    var time = pad(h) + ":" + pad(mi) + ":" + pad(s);
    return withDate ? y + "-" + pad(mo + 1) + "-" + pad(d) + " " + time : time;
  }

  function zoneName(date) {
    try {
      var parts = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" }).formatToParts(date);
      for (var i = 0; i < parts.length; i++) if (parts[i].type === "timeZoneName") return parts[i].value;
    } catch (e) { /* old browsers: fall through */ }
    return "local";
  }

  function refreshTimes(root) {
    var local = localZone();
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) return;
      var rel = el.querySelector(".rel");
      if (rel) rel.textContent = relative(date);
      var abs = el.querySelector(".abs");
      var zone = el.querySelector(".zone");
      if (abs && zone) {
        abs.textContent = clock(date, local, abs.textContent.indexOf("-") >= 0);
        zone.textContent = local ? zoneName(date) : "UTC";
      }
      el.title = local ? date.toISOString() : date.toLocaleString(undefined, { timeZoneName: "short" });
    });
    var toggle = document.querySelector("[data-zone-toggle]");
    if (toggle) toggle.textContent = local ? "Times: local" : "Times: UTC";
  }

  function bindZoneToggle() {
    var toggle = document.querySelector("[data-zone-toggle]");
    if (!toggle) return;
    toggle.hidden = false;
    toggle.addEventListener("click", function () {
      localStorage.setItem("natflowZone", localZone() ? "utc" : "local");
      refreshTimes(document);
    });
  }

  function live() {
    var url = document.body.getAttribute("data-live");
    if (!url || !window.EventSource) return;
    var source = new EventSource(url);
    source.addEventListener("patch", function (event) {
      var parts = JSON.parse(event.data);
      Object.keys(parts).forEach(function (id) {
        var el = document.getElementById(id);
        if (el) el.innerHTML = parts[id];
      });
      refreshTimes(document);
      bindJsonChecks(document);
      var n = Number(document.body.getAttribute("data-patches") || "0") + 1;
      document.body.setAttribute("data-patches", String(n));
    });
    source.addEventListener("done", function () {
      source.close();
      document.body.setAttribute("data-live-done", "1");
    });
  }

  function jsonProblem(text) {
    if (!text.trim()) return null;
    try {
      JSON.parse(text);
      return null;
    } catch (e) {
      return "Not valid JSON: " + e.message + ". Strings need double quotes, e.g. {\"approved\": true}.";
    }
  }

  function bindJsonChecks(root) {
    root.querySelectorAll("form").forEach(function (form) {
      if (form.dataset.checked) return;
      var areas = form.querySelectorAll("textarea[data-json]");
      if (!areas.length) return;
      form.dataset.checked = "1";
      var box = form.querySelector(".field-error");
      function check() {
        for (var i = 0; i < areas.length; i++) {
          var problem = jsonProblem(areas[i].value);
          areas[i].classList.toggle("invalid", !!problem);
          if (problem) return problem;
        }
        return null;
      }
      areas.forEach(function (area) {
        area.addEventListener("input", function () {
          var problem = check();
          if (box && !problem) box.hidden = true;
        });
      });
      form.addEventListener("submit", function (event) {
        var problem = check();
        if (problem) {
          event.preventDefault();
          if (box) {
            box.textContent = problem;
            box.hidden = false;
          }
        }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    bindZoneToggle();
    refreshTimes(document);
    bindJsonChecks(document);
    live();
    setInterval(function () { refreshTimes(document); }, 10000);
  });
})();
