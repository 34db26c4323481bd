// The demo's home page: sends each example's form to its endpoint, shows the reply with
// links to its jobs, and keeps the list of latest jobs live by polling /demo/jobs.
// Everything received is put on the page as text (textContent), never as HTML.
"use strict";

(() => {
  const POLL_MS = 1000;
  const ENDED = new Set(["succeeded", "failed", "cancelled", "discarded"]);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function link(href, text) {
    const a = el("a", text);
    if (typeof href === "string" && href.startsWith("/") && !href.startsWith("//")) {
      a.href = href; // only this service's own paths
    }
    return a;
  }

  function percent(fraction) {
    return fraction === null || fraction === undefined ? "" : `${Math.round(fraction * 100)}%`;
  }

  function progressBar(fraction) {
    const bar = el("progress");
    bar.max = 1;
    if (fraction !== null && fraction !== undefined) bar.value = fraction;
    return bar;
  }

  function request(form) {
    // getAttribute, not form.dataset: a form's fields are also its properties, and the
    // export form has a field named "dataset".
    let path = form.getAttribute("data-path");
    const query = new URLSearchParams();
    const json = {};
    let hasJson = false;
    let body = null;
    const headers = { Accept: "application/json" };
    for (const field of form.querySelectorAll("[data-in]")) {
      const where = field.getAttribute("data-in");
      if (where === "path") {
        path = path.replace(`{${field.name}}`, encodeURIComponent(field.value));
      } else if (where === "query") {
        if (field.value !== "") query.append(field.name, field.value);
      } else if (where === "json") {
        json[field.name] = field.type === "number" ? Number(field.value) : field.value;
        hasJson = true;
      } else if (where === "file") {
        body = new FormData();
        if (field.files.length) body.append(field.name, field.files[0]);
      }
    }
    if (hasJson) {
      body = JSON.stringify(json);
      headers["Content-Type"] = "application/json";
    }
    const search = query.toString();
    return { url: search ? `${path}?${search}` : path, init: { method: "POST", headers, body } };
  }

  async function follow(statusUrl, line, download) {
    // Poll an upload's or export's status until its job has ended.
    for (;;) {
      let data;
      try {
        const response = await fetch(statusUrl, { headers: { Accept: "application/json" } });
        data = await response.json();
      } catch (error) {
        line.textContent = `status unavailable: ${error}`;
        return;
      }
      line.textContent = `${data.state} ${percent(data.progress)} ${data.message || ""}`.trim();
      if (ENDED.has(data.state)) {
        if (data.download_url) download.replaceChildren(link(data.download_url, "download the result"));
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  function show(output, response, data) {
    const parts = [el("div", `${response.status} ${response.statusText}`, response.ok ? "ok" : "bad")];
    if (data && Array.isArray(data.jobs)) {
      const list = el("ul", null, "job-links");
      for (const job of data.jobs) {
        const item = el("li");
        item.append(link(job.url, job.task.split(":").pop()), el("span", ` ${job.id}`, "id"));
        list.append(item);
      }
      parts.push(list);
    }
    if (data && data.status_url) {
      const line = el("div", "waiting…", "follow");
      const download = el("div");
      parts.push(line, download);
      follow(data.status_url, line, download);
    }
    parts.push(el("pre", JSON.stringify(data, null, 2)));
    output.replaceChildren(...parts);
  }

  async function submit(form, output) {
    const { url, init } = request(form);
    output.replaceChildren(el("div", "sending…"));
    try {
      const response = await fetch(url, init);
      let data = null;
      try {
        data = await response.json();
      } catch {
        data = null;
      }
      show(output, response, data);
    } catch (error) {
      output.replaceChildren(el("div", `request failed: ${error}`, "bad"));
    }
    refreshJobs();
  }

  function jobRow(job) {
    const row = el("tr", null, `state-${job.state}`);
    const task = el("td");
    const name = link(job.url, job.task);
    name.title = job.id;
    task.append(name);
    const state = el("td");
    state.append(el("span", job.state, "badge"));
    if (job.attempts > 1) state.append(el("span", ` attempt ${job.attempts}`, "meta"));
    if (job.error) state.append(el("div", job.error, "error"));
    const progress = el("td");
    if (job.progress !== null || job.state === "running") {
      progress.append(progressBar(job.progress), el("span", ` ${percent(job.progress)}`, "meta"));
    }
    if (job.message) progress.append(el("div", job.message, "meta"));
    row.append(task, state, progress);
    return row;
  }

  async function refreshJobs() {
    const body = document.getElementById("jobs");
    if (!body || document.hidden) return;
    try {
      const response = await fetch("/demo/jobs", { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const { jobs } = await response.json();
      if (!jobs.length) {
        const empty = el("td", "No jobs yet.", "empty");
        empty.colSpan = 3;
        const row = el("tr");
        row.append(empty);
        body.replaceChildren(row);
      } else {
        body.replaceChildren(...jobs.map(jobRow));
      }
    } catch {
      // the server may be restarting: try again at the next tick
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const form of document.querySelectorAll("form[data-path]")) {
      const output = form.parentElement.querySelector("output.reply");
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        submit(form, output);
      });
    }
    refreshJobs();
    setInterval(refreshJobs, POLL_MS);
  });
})();
