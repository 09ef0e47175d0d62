// The sync screen: sign in with a workstation token, then a status header,
// pending counts, and tabs, all kept current by the server's status event
// stream (no polling).

import { ApiError, follow, get, post, setToken, token } from "./api.js";
import { $, ago, el } from "./dom.js";
import { TABS } from "./tabs.js";

const state = {
  status: null,
  kinds: {}, // collection -> "catalog" | "voucher"
  me: null,
  tab: sessionStorage.getItem("branchline.tab") || "waiting",
  stream: null, // AbortController of the event stream
  shownKey: "", // what the open tab was rendered from (see changeKey)
  loading: 0, // increments per tab load; a stale load does not overwrite a newer one
};

// -- sign in and out ---------------------------------------------------------------

function showLogin(message) {
  state.stream?.abort();
  state.stream = null;
  $("#app").hidden = true;
  $("#login").hidden = false;
  const error = $("#login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("#token").value = "";
  $("#token").focus();
}

function signOut(message) {
  setToken(null);
  showLogin(message);
}

async function signIn() {
  try {
    const [me, collections] = await Promise.all([get("/me"), get("/collections")]);
    state.me = me;
    state.kinds = Object.fromEntries(collections.map((c) => [c.name, c.kind]));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut("This token is not valid on this branch server. Ask whoever runs it for one (branchline node users add NAME).");
    } else {
      signOut(err.message);
    }
    return;
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  document.body.classList.toggle("read-only", Boolean(state.me.read_only));
  $("#user").textContent = state.me.read_only ? `${state.me.user} (read only)` : state.me.user;
  selectTab(state.tab in TABS ? state.tab : "waiting", { load: false });
  // The status first (the figures a user looks at), then the open tab.
  try {
    render(await get("/status"));
  } catch (err) {
    fail(err);
  }
  loadTab();
  state.stream = new AbortController();
  follow({
    signal: state.stream.signal,
    onStatus: render,
    onLive: (on) => {
      $("#live").dataset.live = on ? "on" : "off";
      $("#live").textContent = on ? "live" : "reconnecting…";
    },
    onAuth: () => signOut("Signed out: the token is no longer valid."),
  });
}

// -- the status header and counts --------------------------------------------------

function sumBy(pending, kind) {
  const parts = Object.entries(pending).filter(([name, n]) => n > 0 && (state.kinds[name] ?? "catalog") === kind);
  return { total: parts.reduce((a, [, n]) => a + n, 0), parts };
}

function detail(parts) {
  return parts.map(([name, n]) => `${name} ${n}`).join(" · ");
}

// What the open tab depends on: when it changes, the tab is fetched again.
function changeKey(s) {
  return JSON.stringify([s.pending, s.failures, s.conflicts, s.last_sync, s.waiting]);
}

function render(s) {
  state.status = s;
  $("#where").textContent = `${s.dataset} · node ${s.node}`;
  const badge = $("#badge");
  if (s.offline_mode) {
    badge.dataset.state = "paused";
    badge.textContent = "Offline (by choice)";
  } else if (s.online) {
    badge.dataset.state = "online";
    badge.textContent = "Online";
  } else {
    badge.dataset.state = "offline";
    badge.textContent = "Offline";
  }
  badge.title = s.relay ? `relay ${s.relay} (${s.state})` : "no relay configured";
  $("#toggle-offline").textContent = s.offline_mode ? "Go online" : "Work offline";
  showLastSync();

  const catalogs = sumBy(s.pending, "catalog");
  const vouchers = sumBy(s.pending, "voucher");
  $("#pending-catalogs").textContent = catalogs.total;
  $("#pending-catalogs-detail").textContent = detail(catalogs.parts);
  $("#pending-vouchers").textContent = vouchers.total;
  $("#pending-vouchers-detail").textContent = detail(vouchers.parts);
  $("#failed").textContent = `${s.failures.upload} / ${s.failures.download}`;
  $("#conflict-count").textContent =
    `${s.conflicts} conflict${s.conflicts === 1 ? "" : "s"}` + (s.waiting ? ` · ${s.waiting} waiting for a reference` : "");

  const counts = { waiting: s.pending_total, upload: s.failures.upload, download: s.failures.download, conflicts: s.conflicts };
  for (const [tab, n] of Object.entries(counts)) {
    $(`.tabs [data-tab="${tab}"] .n`).textContent = n ? String(n) : "";
  }

  const sync = s.sync ?? { running: false, progress: {} };
  const steps = Object.values(sync.progress ?? {});
  const done = steps.reduce((a, [d]) => a + d, 0);
  const total = steps.reduce((a, [, t]) => a + t, 0);
  $("#progress").hidden = !sync.running || total === 0; // a pass with nothing to move shows no bar
  $("#progress-bar").max = Math.max(total, 1);
  $("#progress-bar").value = total ? done : 0;
  $("#progress-text").textContent = total ? `${done} of ${total}` : "";
  $("#sync-now").disabled = Boolean(sync.running);

  const key = changeKey(s);
  if (key !== state.shownKey && state.shownKey !== "") loadTab();
}

function showLastSync() {
  const s = state.status;
  if (!s) return;
  $("#last-sync").textContent = ago(s.last_sync);
  $("#last-sync").title = s.last_sync ? new Date(s.last_sync).toISOString() : "";
}

// -- tabs ----------------------------------------------------------------------------

function selectTab(tab, { load = true } = {}) {
  state.tab = tab;
  sessionStorage.setItem("branchline.tab", tab);
  for (const b of document.querySelectorAll(".tabs [data-tab]")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  }
  if (load) loadTab();
}

async function loadTab() {
  const mine = ++state.loading;
  const panel = $("#panel");
  state.shownKey = state.status ? changeKey(state.status) : "-";
  const ctx = { kinds: state.kinds, done, fail };
  try {
    const view = await TABS[state.tab](ctx);
    if (mine !== state.loading) return;
    panel.replaceChildren(view);
    panel.dataset.tab = state.tab;
  } catch (err) {
    if (mine !== state.loading) return;
    if (err instanceof ApiError && err.status === 401) return signOut("Signed out: the token is no longer valid.");
    panel.replaceChildren(el("p", { class: "error" }, err.message));
  }
}

// -- actions -------------------------------------------------------------------------

function notice(text, kind = "info") {
  const n = $("#notice");
  n.textContent = text;
  n.dataset.kind = kind;
  n.hidden = !text;
}

function done(message) {
  notice(message);
  loadTab();
}

function fail(err) {
  if (err instanceof ApiError && err.status === 401) return signOut("Signed out: the token is no longer valid.");
  notice(err.message, "error");
}

async function act(button, fn) {
  button.disabled = true;
  try {
    await fn();
  } catch (err) {
    fail(err);
  } finally {
    button.disabled = false;
  }
}

function wire() {
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("#token").value.trim();
    if (!value) return;
    setToken(value);
    signIn();
  });
  $("#logout").addEventListener("click", () => signOut(""));
  $("#sync-now").addEventListener("click", (e) =>
    act(e.currentTarget, async () => {
      await post("/sync");
      notice("Sync started.");
    }),
  );
  $("#toggle-offline").addEventListener("click", (e) =>
    act(e.currentTarget, async () => {
      const goOffline = !state.status?.offline_mode;
      render(await post(goOffline ? "/offline" : "/online"));
      notice(goOffline ? "Working offline: changes are kept here until you go online." : "Back online: syncing.");
    }),
  );
  for (const b of document.querySelectorAll(".tabs [data-tab]")) {
    b.addEventListener("click", () => selectTab(b.dataset.tab));
  }
  setInterval(showLastSync, 15000); // the clock moves; the data comes from the stream
}

wire();
if (token()) signIn();
else showLogin("");
