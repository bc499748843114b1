// The fleet dashboard: polls /api/v1/fleet and redraws. Every value from the
// server is set with textContent (never as markup): a record holding HTML shows
// as text. The page's Content-Security-Policy allows only this script besides.
"use strict";

const PHASES = ["current", "behind", "updating", "staged", "rebooting", "failing", "refusing"];
const POLL_MS = 2000;
let etag = null;
let fleet = null;

function token() {
  const m = /(?:^|[#&])token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("updater-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // out of the address bar
  }
  return sessionStorage.getItem("updater-token");
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function fill(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
  if (!rows.length && empty) {
    const cols = document.querySelectorAll("#" + id + " thead th").length;
    const tr = row([el("span", empty, "muted")]);
    tr.firstChild.colSpan = cols;
    body.appendChild(tr);
  }
}

function age(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
}

function chip(phase) {
  const known = PHASES.includes(phase) ? phase : "behind";
  return el("span", phase, "chip p-" + known);
}

function drawRollout(doc) {
  const v = doc.versions, hosts = doc.hosts.hosts;
  document.getElementById("target").textContent = v.target_version || "–";
  const p = v.progress;
  document.getElementById("progress-text").textContent = p.hosts
    ? `${p.on_target} of ${p.hosts} hosts on target (${Math.round(100 * p.fraction)}%), ${p.staged} staged`
    : "no hosts report";
  const counts = {};
  for (const h of hosts) counts[h.phase] = (counts[h.phase] || 0) + 1;
  const bar = document.getElementById("progress-bar");
  const legend = document.getElementById("phase-legend");
  bar.replaceChildren(); legend.replaceChildren();
  for (const ph of PHASES) {
    const n = counts[ph] || 0;
    if (!n) continue;
    const seg = el("span", null, "p-" + ph);
    seg.style.width = (100 * n / hosts.length) + "%";
    seg.title = `${ph}: ${n}`;
    bar.appendChild(seg);
    const item = el("span");
    item.appendChild(el("i", null, "p-" + ph));
    item.appendChild(document.createTextNode(`${ph} ${n}`));
    legend.appendChild(item);
  }
}

function drawVersions(doc) {
  fill("versions", doc.versions.versions.map(v => {
    const states = Object.entries(v.states).map(([s, n]) => `${s} ${n}`).join(", ");
    const tr = row([v.version, v.hosts, v.staged || "", states]);
    tr.dataset.version = v.version;
    return tr;
  }), "no hosts");
}

function drawGroups(doc) {
  fill("groups", doc.groups.groups.map(g => {
    const holders = el("div");
    for (const h of g.holders) {
      const span = el("span", `${h.hostname || h.id} (${age(h.age_s)})`, "holder" + (h.stale ? " stale" : ""));
      span.dataset.holder = h.id;
      holders.appendChild(span);
    }
    if (g.lock_error) holders.appendChild(el("div", g.lock_error, "error"));
    else if (!g.holders.length) holders.appendChild(el("span", "none", "muted"));
    const slots = g.total_slots === null ? "–" : `${g.holders.length} of ${g.total_slots}`;
    const tr = row([g.group, g.hosts, slots, holders]);
    tr.dataset.group = g.group;
    return tr;
  }), "no groups");
}

function drawFailures(doc) {
  fill("failures", doc.hosts.hosts.filter(h => h.last_error_kind || h.blocked_version).map(h => {
    const tr = row([h.hostname, h.group, h.booted_version,
      el("span", h.last_error_kind || ("refuses " + h.blocked_version), "error"), h.last_error]);
    tr.dataset.host = h.hostname;
    return tr;
  }), "no host reports an error");
  const failed = [];
  for (const g of doc.groups.groups) {
    for (const v of g.failed_versions) {
      const detail = v.malformed || v.failures.map(f => `${f.host.slice(0, 12)} (${f.kind})`).join(", ");
      failed.push(row([v.version, g.group, v.hosts, v.blocked ? "blocked" : "no", detail]));
    }
  }
  fill("failed-versions", failed, "no failed versions");
  const box = document.getElementById("unreadable");
  box.replaceChildren();
  for (const u of doc.hosts.unreadable) {
    box.appendChild(el("div", `unreadable ${u.key}: ${u.error}`, "error unreadable"));
  }
}

function drawHosts(doc) {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  const rows = [];
  for (const h of doc.hosts.hosts) {
    const text = [h.hostname, h.group, h.booted_version, h.state, h.phase, h.last_error_kind].join(" ").toLowerCase();
    if (q && !text.includes(q)) continue;
    const waiting = h.lock_held === false && h.state === "UPDATED_NEED_REBOOT";
    const lock = h.held_for_s !== null ? "held " + age(h.held_for_s) : (waiting ? "waiting" : "");
    const tr = row([h.hostname, h.group, h.strategy, h.booted_version, h.state, chip(h.phase),
      h.staged_version, lock, h.last_error_kind]);
    tr.dataset.host = h.hostname;
    tr.dataset.phase = h.phase;
    rows.push(tr);
  }
  fill("hosts", rows, q ? "no host matches" : "no hosts");
}

function draw(doc) {
  fleet = doc;
  drawRollout(doc); drawVersions(doc); drawGroups(doc); drawFailures(doc); drawHosts(doc);
  const st = document.getElementById("status");
  st.dataset.state = doc.up ? "live" : "down";
  st.textContent = (doc.up ? "live" : "etcd unreachable: last read") + " · " + new Date(doc.hosts.read_at * 1000).toLocaleTimeString();
  document.getElementById("revision").textContent = "etcd revision " + doc.hosts.revision;
  document.body.dataset.revision = doc.hosts.revision;
}

async function poll() {
  const headers = {};
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  if (etag) headers["If-None-Match"] = etag;
  try {
    const r = await fetch("/api/v1/fleet", { headers, cache: "no-store" });
    if (r.status === 200) {
      etag = r.headers.get("ETag");
      draw(await r.json());
    } else if (r.status !== 304) {
      const st = document.getElementById("status");
      st.dataset.state = "down";
      st.textContent = r.status === 401 ? "needs a token: open …/#token=TOKEN" : "server answered " + r.status;
    }
  } catch (e) {
    const st = document.getElementById("status");
    st.dataset.state = "down";
    st.textContent = "server unreachable";
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("filter").addEventListener("input", () => { if (fleet) drawHosts(fleet); });
poll();
