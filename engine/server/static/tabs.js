// The tabs below the summary: what waits to go up, what failed up or down,
// conflicts with their resolutions, and two accounting views. Each renderer
// fetches what it shows and returns an element; `ctx.done(message)` reports an
// action's result and refreshes.

import { get, post } from "./api.js";
import { ago, el, table } from "./dom.js";

const ROW_CAP = 500; // rows a list shows at once; the counts above say how many there are

function capped(items, total, noun) {
  if (total <= items.length) return null;
  return el("p", { class: "muted" }, `Showing the first ${items.length} of ${total} ${noun}.`);
}

async function waiting() {
  const items = await get(`/pending?limit=${ROW_CAP}`);
  const list = Array.isArray(items) ? items : items.items;
  const total = Array.isArray(items) ? list.length : items.total ?? list.length;
  if (!list.length) return el("p", { class: "empty" }, "Nothing is waiting to go up.");
  const shown = list.slice(0, ROW_CAP);
  return el(
    "div",
    {},
    el("p", { class: "muted" }, "Saved on this branch server and not yet taken by the relay. They go up by themselves while online."),
    table(
      ["Collection", "Code or number", "Document"],
      shown.map((p) => [p.collection, p.key ?? p.code ?? p.number ?? p.id, el("code", {}, p.doc ?? "")]),
    ),
    capped(shown, total, "changes"),
  );
}

function failures(direction) {
  return async (ctx) => {
    const items = await get(`/failures?direction=${direction}`);
    const up = direction === "upload";
    if (!items.length) {
      return el("p", { class: "empty" }, up ? "Nothing failed to go up." : "Nothing failed to come down.");
    }
    const retry = async (button, path, what) => {
      button.disabled = true;
      try {
        const r = await post(path);
        ctx.done(`Retry asked for ${what} (${r.retrying.length}); it goes at the next sync.`);
      } catch (err) {
        button.disabled = false;
        ctx.fail(err);
      }
    };
    const shown = items.slice(0, ROW_CAP);
    const rows = shown.map((f) => {
      const records = f.records.length > 3 ? `${f.records.slice(0, 3).join(", ")} +${f.records.length - 3}` : f.records.join(", ");
      let action;
      if (f.retrying) action = el("span", { class: "muted" }, "retry asked");
      else {
        action = el("button", { type: "button", class: "write", "data-retry": f.id }, "Retry");
        action.addEventListener("click", () => retry(action, `/failures/${f.id}/retry`, `failure ${f.id}`));
      }
      return [
        f.collection ?? "",
        el("code", {}, f.document),
        records,
        el("span", { class: "reason" }, f.reason),
        String(f.attempts),
        ago(f.last_attempt),
        action,
      ];
    });
    const all = el("button", { type: "button", class: "write", id: "retry-all" }, "Retry all");
    all.addEventListener("click", () => retry(all, "/failures/retry", "every failure"));
    return el(
      "div",
      {},
      el(
        "div",
        { class: "bar" },
        el(
          "span",
          { class: "muted" },
          up
            ? "The relay refused these changes. They stay on this server; fix the cause, then retry."
            : "These changes from other branches could not be applied here.",
        ),
        all,
      ),
      table(["Collection", "Document", "Records", "Reason", "Attempts", "Last attempt", ""], rows),
      capped(shown, items.length, "failures"),
    );
  };
}

// -- conflicts ---------------------------------------------------------------------

function recordLabel(record, fallback) {
  if (!record) return fallback;
  const code = record.code ?? record.number;
  const name = record.name ?? record.description;
  return [code, name].filter(Boolean).join(" · ") || fallback;
}

async function records(collection, ids) {
  const out = new Map();
  await Promise.all(
    ids.map(async (id) => {
      try {
        out.set(id, await get(`/records/${encodeURIComponent(collection)}/${encodeURIComponent(id)}`));
      } catch {
        out.set(id, null); // shown by its id
      }
    }),
  );
  return out;
}

function shown(value) {
  if (value === null || value === undefined) return "(empty)";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function choice(label, body, ctx, conflict, attrs = {}) {
  const button = el("button", { type: "button", class: "write", ...attrs }, label);
  button.addEventListener("click", async () => {
    const payload = typeof body === "function" ? body() : body;
    if (!payload) return;
    button.disabled = true;
    try {
      const entry = await post(`/conflicts/${conflict.id}/resolve`, payload);
      ctx.done(`Resolved ${conflict.kind.replace("_", " ")}: ${entry.action ?? "done"}. It reaches the other branches at the next sync.`);
    } catch (err) {
      button.disabled = false;
      ctx.fail(err);
    }
  });
  return button;
}

async function duplicateForm(c, ctx) {
  const byId = await records(c.collection, c.records);
  const option = (id) => el("option", { value: id }, recordLabel(byId.get(id), id));
  const values = el(
    "ul",
    {},
    c.values.map((v) =>
      el(
        "li",
        { class: v.in_force ? "in-force" : null, "data-record": v.value },
        `${recordLabel(byId.get(v.value), v.value)} — created at ${v.node}`,
        v.in_force ? " (used for references)" : "",
      ),
    ),
  );
  const losers = c.records.filter((id) => id !== c.values.find((v) => v.in_force)?.value);
  const renamed = el("select", { name: "record", "aria-label": "record to rename" }, (losers.length ? losers : c.records).map(option));
  const code = el("input", { name: "code", placeholder: `new ${c.field}`, "aria-label": `new ${c.field}`, spellcheck: "false" });
  const kept = el("select", { name: "into", "aria-label": "record to keep" }, c.records.map(option));
  const forms = [
    el(
      "form",
      { onsubmit: (e) => e.preventDefault() },
      el("span", {}, "Two different records: rename"),
      renamed,
      el("span", {}, "to"),
      code,
      choice("Rename", () => {
        const value = code.value.trim();
        if (!value) {
          code.focus();
          return null;
        }
        return { rename: value, record: renamed.value };
      }, ctx, c, { "data-action": "rename" }),
    ),
    el(
      "form",
      { onsubmit: (e) => e.preventDefault() },
      el("span", {}, "The same record twice: keep"),
      kept,
      choice("Merge the others into it", () => ({ merge_into: kept.value }), ctx, c, { "data-action": "merge" }),
    ),
  ];
  if (ctx.kinds[c.collection] === "voucher") {
    forms.push(
      el("form", { onsubmit: (e) => e.preventDefault() }, el("span", {}, "Give the later vouchers fresh numbers:"),
        choice("Renumber", { renumber: true }, ctx, c, { "data-action": "renumber" })),
    );
  }
  return [values, ...forms];
}

function keepForm(c, ctx) {
  const values = el(
    "ul",
    {},
    c.values.map((v) => el("li", { class: v.in_force ? "in-force" : null }, `${v.node}: ${shown(v.value)}`, v.in_force ? " (in force)" : "")),
  );
  const buttons =
    c.kind === "edit_delete"
      ? [choice("Keep it deleted", { keep: "delete" }, ctx, c, { "data-action": "keep-delete" }),
         choice("Keep the edit (restore it)", { keep: "edit" }, ctx, c, { "data-action": "keep-edit" })]
      : c.values.map((v) => choice(`Keep ${v.node}'s value`, { keep: v.node }, ctx, c, { "data-action": `keep-${v.node}` }));
  return [values, el("form", { onsubmit: (e) => e.preventDefault() }, el("span", {}, "Resolve:"), buttons)];
}

const KIND = {
  duplicate_key: "Duplicate code",
  concurrent_edit: "Edited at two branches",
  edit_delete: "Edited and deleted",
  dangling_reference: "Refers to a missing record",
  locked_period: "Locked period",
};

async function conflicts(ctx) {
  const items = await get("/conflicts");
  if (!items.length) return el("p", { class: "empty" }, "No conflicts.");
  const cards = await Promise.all(
    items.slice(0, ROW_CAP).map(async (c) => {
      let body = [];
      if (c.kind === "duplicate_key") body = await duplicateForm(c, ctx);
      else if (c.kind === "concurrent_edit" || c.kind === "edit_delete") body = keepForm(c, ctx);
      return el(
        "article",
        { class: "conflict card", "data-conflict": c.id, "data-kind": c.kind },
        el(
          "div",
          { class: "head" },
          el("span", { class: "kind" }, KIND[c.kind] ?? c.kind),
          el("span", {}, c.kind === "duplicate_key" ? `${c.collection} · ${c.field} ${c.key}` : `${c.collection} · ${c.field ?? ""}`),
          el("code", { class: "muted" }, c.id.slice(0, 8)),
        ),
        el("p", { class: "muted" }, c.explanation),
        body,
      );
    }),
  );
  return el("div", { class: "conflicts" }, cards, capped(cards, items.length, "conflicts"));
}

// -- reports -----------------------------------------------------------------------

const NAMES_CAP = 1000; // catalog records fetched to name a report's codes (the API's page limit)

/** code -> name of a catalog's first NAMES_CAP records (codes past that show alone). */
async function names(collection) {
  try {
    const page = await get(`/records/${collection}?limit=${NAMES_CAP}`);
    return new Map(page.items.filter((r) => r.code && r.name).map((r) => [r.code, r.name]));
  } catch {
    return new Map();
  }
}

// Which report columns hold codes of which catalog.
const NAMED = { item: "items", warehouse: "warehouses", customer: "customers" };

function report(name, intro) {
  return async () => {
    const r = await get(`/reports/${name}`);
    if (!r.rows.length) return el("p", { class: "empty" }, "Nothing to show yet.");
    const rows = r.rows.slice(0, ROW_CAP);
    const named = r.columns.map((c) => NAMED[c]);
    const maps = await Promise.all(named.map((coll) => (coll ? names(coll) : null)));
    const cells = rows.map((row) =>
      row.map((cell, i) => {
        const nm = maps[i]?.get(cell);
        return nm ? el("span", {}, el("code", {}, cell), " ", nm) : cell;
      }),
    );
    return el("div", {}, el("p", { class: "muted" }, intro), table(r.columns.map((c) => c[0].toUpperCase() + c.slice(1).replaceAll("_", " ")), cells), capped(rows, r.rows.length, "rows"));
  };
}

export const TABS = {
  waiting,
  upload: failures("upload"),
  download: failures("download"),
  conflicts,
  stock: report("stock_on_hand", "Per item and warehouse, from this branch server's books (what it holds now)."),
  receivables: report("receivables", "Per customer: unpaid invoices including VAT, less cash received."),
};
