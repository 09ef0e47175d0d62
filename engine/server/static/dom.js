// Small DOM helpers. Data is only ever put in as text (textContent), never as
// HTML, so a record's name cannot inject markup.

/** `el("td", {class: "num"}, "12")`: an element with attributes and children
 * (strings become text nodes; null and false are skipped). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

const NUMBER = /^-?\d+(\.\d+)?$/;

/** Decimal text (the API sends decimals as strings) grouped for reading. */
export function number(text) {
  const s = String(text);
  if (!NUMBER.test(s)) return s;
  const [whole, frac] = s.split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const trimmed = frac && frac.replace(/0+$/, "");
  return trimmed ? `${grouped}.${trimmed}` : grouped;
}

/** A table of `columns` (names) and `rows` (arrays of cells); numbers right-aligned. */
export function table(columns, rows, { numeric = [] } = {}) {
  const isNum = (i, v) => numeric.includes(i) || (typeof v === "string" && NUMBER.test(v)) || typeof v === "number";
  const right = columns.map((_, i) => rows.length > 0 && rows.every((r) => r[i] === null || r[i] === "" || isNum(i, r[i])));
  return el(
    "div",
    { class: "scroll" },
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, columns.map((c, i) => el("th", { class: right[i] ? "num" : null }, c)))),
      el(
        "tbody",
        {},
        rows.map((r) =>
          el(
            "tr",
            {},
            r.map((cell, i) =>
              cell instanceof Node
                ? el("td", {}, cell)
                : el("td", { class: right[i] ? "num" : null }, right[i] && cell !== null ? number(cell) : cell ?? ""),
            ),
          ),
        ),
      ),
    ),
  );
}

/** "just now", "5 min ago", or a date and time, for a time in ms. */
export function ago(ms, now = Date.now()) {
  if (!ms) return "never";
  const s = Math.round((now - ms) / 1000);
  if (s < 10) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return new Date(ms).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}
