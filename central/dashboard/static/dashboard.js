// storelink HQ dashboard: keeps the server-rendered page current. Every few seconds (the
// body's data-refresh) it fetches this same page and swaps in its #live part, so the one
// renderer is the server's and the page reads the same without this script. Typing in the
// filter refreshes at once and keeps the filter in the address bar.
"use strict";
(function () {
  const seconds = Number(document.body.dataset.refresh || "5");
  const stale = document.getElementById("stale");
  // An action's answer is shown at its POST address: refresh (and reload) the page itself.
  const src = document.body.dataset.src || location.pathname;
  if (location.pathname !== src) history.replaceState(null, "", src);
  let timer = null;
  let inFlight = false;

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const resp = await fetch(location.pathname + location.search, { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.getElementById("live");
      const live = document.getElementById("live");
      if (fresh && live) live.replaceWith(fresh);
      stale.hidden = true;
    } catch (err) {
      stale.hidden = false;
    } finally {
      inFlight = false;
    }
  }

  function schedule() {
    clearInterval(timer);
    timer = setInterval(refresh, seconds * 1000);
  }

  const filter = document.getElementById("filter");
  if (filter) {
    let typing = null;
    const apply = function () {
      const params = new URLSearchParams(new FormData(filter));
      for (const [key, value] of Array.from(params.entries())) {
        if (!value) params.delete(key);
      }
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
      refresh();
      schedule();
    };
    filter.addEventListener("input", function () {
      clearTimeout(typing);
      typing = setTimeout(apply, 250);
    });
    filter.addEventListener("submit", function (event) {
      event.preventDefault();
      apply();
    });
  }
  schedule();
})();
