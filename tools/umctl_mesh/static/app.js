// The Moonmesh dashboard: polls /api/state, draws it, and sends actions with the API token.
// No framework and no build step; every text goes in through textContent.
"use strict";

const SLOTS = 16384;
const COLORS = ["#2f6fdb", "#d9480f", "#2b8a3e", "#ae3ec9", "#c2255c", "#0c8599",
                "#e67700", "#5f3dc4", "#5c940d", "#1864ab", "#a61e4d", "#495057"];
const TOKEN_KEY = "moonmesh-api-token";

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let state = null;
let timer = null;
let polling = false;
const cards = new Map();   // cluster -> {root, live, forms}
const tracked = [];        // actions followed until the mesh has done them

// -- small helpers ---------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const color = (index) => COLORS[index % COLORS.length];
const ops = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString());
const ranges = (rs) => rs.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(" ");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function call(method, path, body) {
  const resp = await fetch(path, {method, headers: headers(true),
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  let doc = null;
  try { doc = await resp.json(); } catch (e) { doc = null; }
  if (!resp.ok) throw new Error((doc && doc.error) || `HTTP ${resp.status}`);
  return doc;
}

// -- actions ---------------------------------------------------------------------------------

function logAction(text) {
  const li = el("li", {"data-state": "running"}, text);
  $("actions").prepend(li);
  return li;
}

function settle(li, st, text) {
  li.dataset.state = st;
  li.textContent = text;
}

// Send an action; `outcome(doc)` says what it did: {text, cluster, epoch, follow, replicas}.
// A followed one stays "running" until the cluster reaches that epoch with no migrations.
async function act(label, method, path, body, outcome) {
  const li = logAction(`${label}: sending…`);
  try {
    const doc = await call(method, path, body);
    const o = outcome(doc);
    if (o.follow) {
      settle(li, "running", `${label}: ${o.text}; running…`);
      tracked.push({li, label, cluster: o.cluster, epoch: o.epoch, replicas: o.replicas});
    } else {
      settle(li, "finished", `${label}: ${o.text}`);
    }
  } catch (e) {
    settle(li, "failed", `${label}: refused: ${e.message}`);
  }
  poll();
}

function follow() {
  if (!state || !state.ready) return;
  for (let i = tracked.length - 1; i >= 0; i--) {
    const t = tracked[i];
    const c = state.clusters.find((x) => x.cluster === t.cluster);
    if (!c) {
      settle(t.li, "failed", `${t.label}: cluster ${t.cluster} is gone`);
      tracked.splice(i, 1);
      continue;
    }
    const applied = c.shards.every((s) => s.nodes.every(
      (n) => n.failed || !n.alive || (n.applied_epoch || 0) >= c.epoch));
    const synced = !t.replicas || c.shards.every((s) => s.replicas_live === c.replicas_declared);
    if (c.epoch >= t.epoch && c.migrations.length === 0 && applied && synced) {
      settle(t.li, "finished", `${t.label}: finished at epoch ${c.epoch}`);
      tracked.splice(i, 1);
    } else {
      const moved = c.migrations.reduce((a, m) => a + m.moved_keys, 0);
      t.li.textContent = `${t.label}: running, epoch ${c.epoch}, ` +
        `${c.migrations.length} migration(s) left, ${moved} keys moved in the running ones`;
    }
  }
}

function planOutcome(name) {
  return (doc) => {
    const parts = [doc.replicas, doc.shards].filter(Boolean);
    const docs = parts.length ? parts : [doc];
    const changed = docs.some((d) => d.changed);
    const epoch = Math.max(...docs.map((d) => d.epoch));
    if (!changed) return {text: "already so, nothing to do", follow: false};
    const moves = doc.shards ? doc.shards.migrations : doc.migrations;
    const slots = (moves || []).reduce((a, m) => a + m.slot_count, 0);
    return {text: `epoch ${epoch}, ${slots} slots to move in ${(moves || []).length} ` +
                  "migration(s)", follow: true, cluster: name, epoch,
            replicas: Boolean(doc.replicas)};
  };
}

function clusterForms(name) {
  const scale = el("form", {class: "inline", "data-action": "scale"},
    el("strong", {}, "Scale"),
    el("label", {}, "shards ", el("input", {name: "shards", type: "number", min: 1,
                                            id: `scale-shards-${name}`})),
    el("label", {}, "replicas ", el("input", {name: "replicas", type: "number", min: 0,
                                              id: `scale-replicas-${name}`})),
    el("button", {type: "submit", id: `scale-${name}`}, "Scale"));
  scale.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = {};
    for (const f of ["shards", "replicas"]) {
      const v = scale.elements[f].value.trim();
      if (v !== "") body[f] = Number(v);
    }
    const what = Object.entries(body).map(([k, v]) => `${k} ${v}`).join(", ") || "nothing";
    act(`scale ${name} (${what})`, "POST", `/api/clusters/${encodeURIComponent(name)}/scale`,
        body, planOutcome(name));
  });

  const target = el("select", {name: "to"});
  const migrate = el("form", {class: "inline", "data-action": "migrate"},
    el("strong", {}, "Migrate"),
    el("label", {}, "slots ", el("input", {name: "slots", size: 10, placeholder: "0-99 200"})),
    el("label", {}, "to ", target),
    el("button", {type: "submit"}, "Migrate"),
    el("button", {type: "button", onclick: () => act(
      `cancel migrations of ${name}`, "POST",
      `/api/clusters/${encodeURIComponent(name)}/cancel`, {}, planOutcome(name))},
      "Cancel migrations"));
  migrate.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const slots = migrate.elements.slots.value.trim();
    act(`migrate ${slots} of ${name} to ${target.value}`, "POST",
        `/api/clusters/${encodeURIComponent(name)}/migrate`, {slots, to: target.value},
        planOutcome(name));
  });

  const shard = el("select", {name: "shard"});
  const failover = el("form", {class: "inline", "data-action": "failover"},
    el("strong", {}, "Failover"),
    el("label", {}, "shard ", shard),
    el("label", {}, "to ", el("input", {name: "to", size: 12, placeholder: "best replica"})),
    el("button", {type: "submit"}, "Fail over"));
  failover.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = {shard: shard.value};
    const to = failover.elements.to.value.trim();
    if (to) body.to = to;
    act(`failover of ${name} ${shard.value}`, "POST",
        `/api/clusters/${encodeURIComponent(name)}/failover`, body,
        (doc) => ({text: `${doc.master} is the master (epoch ${doc.epoch})`,
                   follow: true, cluster: name, epoch: doc.epoch}));
  });
  return {row: el("div", {class: "actions-row"}, scale, migrate, failover),
          selects: [target, shard]};
}

// -- drawing ---------------------------------------------------------------------------------

function slotMap(c) {
  const index = new Map(c.shards.map((s, i) => [s.id, i]));
  const at = (a, b) => `left:${(a / SLOTS) * 100}%;width:${((b - a + 1) / SLOTS) * 100}%;`;
  const bar = el("div", {class: "slotmap", "data-cluster": c.cluster});
  for (const s of c.shards) {
    for (const [a, b] of s.slots) {
      bar.append(el("div", {
        class: "seg", "data-shard": s.id, "data-start": a, "data-end": b,
        title: `${s.id}: slots ${a}-${b} (${b - a + 1})`,
        style: at(a, b) + `background-color:${color(index.get(s.id))}`,
      }, (b - a + 1) / SLOTS > 0.06 ? s.id : ""));
    }
  }
  // ranges on the move: hatched over their source, underlined in their target's colour
  for (const m of c.migrations) {
    for (const [a, b] of m.slots) {
      bar.append(el("div", {
        class: "mig", "data-migration": m.id,
        title: `slots ${a}-${b}: ${m.from} → ${m.to} (${m.state})`,
        style: at(a, b) + `border-bottom-color:${color(index.get(m.to))}`,
      }));
    }
  }
  return [bar, el("div", {class: "axis"}, el("span", {}, "0"), el("span", {}, "8192"),
                  el("span", {}, "16383"))];
}

function shardTable(c, rates) {
  const rows = [];
  c.shards.forEach((s, i) => {
    s.nodes.forEach((n, j) => {
      rows.push(el("tr", {"data-shard": s.id, "data-member": n.node},
        el("td", {}, j === 0 ? [el("span", {class: "swatch",
                                            style: `background:${color(i)}`}), s.id] : ""),
        el("td", {class: "num"}, j === 0 ? s.slot_count : ""),
        el("td", {}, j === 0 ? ranges(s.slots) : ""),
        el("td", {class: n.failed ? "failed" : ""}, n.role + (n.failed ? " (failed)" : "")),
        el("td", {}, n.node),
        el("td", {}, n.proxy),
        el("td", {}, n.host || "–"),
        el("td", {class: "health-" + n.health.replace(" ", "-")}, n.health),
        el("td", {class: "num"}, n.applied_epoch ?? "–"),
        el("td", {class: "num", "data-ops": n.node}, ops(rates.get(n.node)))));
    });
  });
  return el("table", {class: "shards"},
    el("thead", {}, el("tr", {}, ["shard", "slots", "ranges", "role", "node", "proxy", "host",
                                  "health", "epoch", "ops/s"].map((h) => el("th", {
                                    class: ["slots", "epoch", "ops/s"].includes(h) ? "num" : ""
                                  }, h)))),
    el("tbody", {}, rows));
}

function migrationTable(c) {
  if (!c.migrations.length) {
    return el("p", {class: "muted migrations", "data-cluster": c.cluster, "data-count": 0},
              "no migrations");
  }
  const rows = c.migrations.map((m) => {
    const total = m.left_keys === null ? null : m.moved_keys + m.left_keys;
    const pct = total ? Math.min(100, (100 * m.moved_keys) / total) : (m.state === "committing" ? 100 : 0);
    return el("tr", {"data-migration": m.id, "data-state": m.state},
      el("td", {}, `${m.from} → ${m.to}`),
      el("td", {class: "num"}, m.slot_count),
      el("td", {}, m.state),
      el("td", {}, el("span", {class: "progress", title: `${pct.toFixed(0)}%`},
                      el("div", {style: `width:${pct}%`})), ` ${pct.toFixed(0)}%`),
      el("td", {class: "num"}, m.moved_keys.toLocaleString()),
      el("td", {class: "num"}, m.left_keys === null ? "–" : m.left_keys.toLocaleString()),
      el("td", {class: "num"}, Math.round(m.keys_per_sec).toLocaleString()),
      el("td", {class: "num"}, m.eta_sec === null ? "–" : `${Math.round(m.eta_sec)} s`),
      el("td", {class: m.error ? "failed" : ""}, m.error || ""));
  });
  return el("table", {class: "migrations", "data-cluster": c.cluster,
                      "data-count": c.migrations.length},
    el("thead", {}, el("tr", {}, ["migration", "slots", "state", "progress", "moved", "left",
                                  "keys/s", "eta", "error"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function drawCluster(c, rates) {
  let card = cards.get(c.cluster);
  if (!card) {
    const forms = clusterForms(c.cluster);
    const title = el("h3", {});
    const live = el("div", {});
    const root = el("div", {class: "card cluster", "data-cluster": c.cluster}, title, live, forms.row);
    card = {root, title, live, selects: forms.selects};
    cards.set(c.cluster, card);
  }
  card.root.dataset.epoch = c.epoch;
  card.title.replaceChildren(c.cluster, el("small", {},
    `epoch ${c.epoch} · ${c.shards.length} shards · ${c.replicas_declared} replicas/shard` +
    (c.password ? " · password" : "") +
    (c.min_replicas_ack ? ` · sync writes (${c.min_replicas_ack})` : "")));
  const lost = c.lost.map((line) => el("div", {class: "lost", "data-lost": ""}, `DATA LOST: ${line}`));
  card.live.replaceChildren(...slotMap(c), ...lost, shardTable(c, rates), migrationTable(c));
  for (const select of card.selects) {
    const keep = select.value;
    select.replaceChildren(...c.shards.map((s) => el("option", {value: s.id}, s.id)));
    if (c.shards.some((s) => s.id === keep)) select.value = keep;
  }
  return card.root;
}

function drawHosts(st, rates) {
  const out = [];
  for (const h of st.hosts) {
    const rows = h.nodes.map((n) => el("tr", {"data-node": n.node, "data-role": n.role},
      el("td", {}, (n.leader ? "★ " : "") + n.node),
      el("td", {}, n.proxy || "–"),
      el("td", {}, n.backend || "–"),
      el("td", {}, n.cluster || "–"),
      el("td", {class: n.failed ? "failed" : ""}, n.role + (n.failed ? " (failed)" : "")),
      el("td", {class: "health-" + n.health.replace(" ", "-")}, n.health),
      el("td", {class: "num"}, n.applied_epoch ?? "–"),
      el("td", {class: "num", "data-ops": n.node}, ops(rates.get(n.node))),
      el("td", {}, ["master", "replica"].includes(n.role) ? el("button", {
        type: "button", onclick: () => act(`drain ${n.node}`, "POST",
          `/api/nodes/${encodeURIComponent(n.node)}/drain`, {},
          (doc) => ({text: doc.how === "removed" ? `left ${doc.cluster} (epoch ${doc.epoch})`
                                                 : `its slots are migrating away`,
                     follow: true, cluster: doc.cluster, epoch: doc.epoch}))}, "Drain") : "")));
    out.push(el("div", {class: "host", "data-host": h.host},
      el("h4", {}, h.host ? `host ${h.host}` : "no host tag", el("span", {class: "muted"},
         ` · ${h.nodes.length} node(s)`)),
      el("table", {class: "nodes"},
        el("thead", {}, el("tr", {}, ["node", "proxy", "backend", "cluster", "role", "health",
                                      "epoch", "ops/s", ""].map((x) => el("th", {}, x)))),
        el("tbody", {}, rows))));
  }
  $("hosts").replaceChildren(...out);
}

function drawFailovers(st) {
  const items = st.failovers.map((e) => el("li", {"data-cluster": e.cluster},
    `${clock(e.at)} ${e.cluster} ${e.shard}: ${e.from} → ${e.to} (epoch ${e.epoch})` +
    (e.from_failed ? ", the old master failed" : "")));
  for (const c of st.clusters) {
    if (c.failed.length) items.push(el("li", {class: "failed"},
      `${c.cluster}: failed members ${c.failed.join(", ")} (they rejoin as replicas)`));
  }
  if (!items.length) items.push(el("li", {class: "muted"}, "none seen since this server started"));
  $("failovers").replaceChildren(...items);
}

function drawAuth(st) {
  const auth = $("auth");
  if (!st.auth.token_configured) {
    auth.dataset.state = "disabled";
    auth.textContent = "actions disabled on this server (no token)";
  } else if (!token) {
    auth.dataset.state = "none";
    auth.textContent = "read-only: enter the token for actions";
  } else if (st.auth.token_valid) {
    auth.dataset.state = "valid";
    auth.textContent = "token accepted";
  } else {
    auth.dataset.state = "invalid";
    auth.textContent = "token not accepted";
  }
}

function render() {
  const st = state;
  drawAuth(st);
  const banner = $("error");
  banner.hidden = !st.error;
  banner.textContent = st.error ? `cannot read the mesh: ${st.error}` : "";
  const live = $("live");
  live.dataset.state = st.error ? "error" : "live";
  live.textContent = st.time ? `updated ${clock(st.time)}` : "waiting for the first read";
  if (!st.ready) return;
  const rates = new Map(st.nodes.map((n) => [n.node, n.ops_per_sec]));
  const total = st.nodes.reduce((a, n) => a + (n.ops_per_sec || 0), 0);
  $("summary").textContent = `${st.nodes.length} nodes, ${st.free} free · ` +
    `${st.clusters.length} clusters · leader ${st.leader || "none"} · ${ops(total)} ops/s · ` +
    `etcd ${st.etcd}`;
  const names = new Set(st.clusters.map((c) => c.cluster));
  for (const name of [...cards.keys()]) if (!names.has(name)) cards.delete(name);
  $("clusters").replaceChildren(...st.clusters.map((c) => drawCluster(c, rates)));
  if (!st.clusters.length) $("clusters").append(el("p", {class: "muted"}, "no clusters"));
  drawHosts(st, rates);
  drawFailovers(st);
  follow();
}

async function poll() {
  if (polling) return;
  polling = true;
  clearTimeout(timer);
  let interval = state && state.interval ? state.interval : 1;
  try {
    const resp = await fetch("/api/state", {headers: headers(false), cache: "no-store"});
    state = await resp.json();
    interval = state.interval || interval;
    render();
  } catch (e) {
    $("live").dataset.state = "error";
    $("live").textContent = `dashboard server unreachable (${e.message})`;
  } finally {
    polling = false;
    timer = setTimeout(poll, interval * 1000);
  }
}

// -- wiring ----------------------------------------------------------------------------------

$("token").value = token;
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  poll();
});

$("create-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target.elements;
  const body = {name: f.name.value.trim(), shards: Number(f.shards.value),
                replicas: Number(f.replicas.value || 0)};
  if (f.password.value) body.password = f.password.value;
  act(`create ${body.name}`, "POST", "/api/clusters", body,
      (doc) => ({text: `created at epoch ${doc.epoch}`, follow: true, cluster: doc.cluster,
                 epoch: doc.epoch}));
});

poll();
