/**
 * Tiny DOM builder.  User strings (run names, concept words, layer names) only ever
 * reach the page through `textContent` or attributes set one by one: no HTML strings.
 */
type Child = Node | string | null | undefined | false;

export interface Props {
  class?: string;
  text?: string;
  title?: string;
  attrs?: Record<string, string>;
  on?: Partial<{ [K in keyof HTMLElementEventMap]: (e: HTMLElementEventMap[K]) => void }>;
}

export function h<K extends keyof HTMLElementTagNameMap>(tag: K, props: Props = {}, children: Child[] = []): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (props.class) el.className = props.class;
  if (props.text !== undefined) el.textContent = props.text;
  if (props.title) el.title = props.title;
  for (const [k, v] of Object.entries(props.attrs ?? {})) el.setAttribute(k, v);
  for (const [k, f] of Object.entries(props.on ?? {})) el.addEventListener(k, f as EventListener);
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

export function clear(el: Element): void {
  el.replaceChildren();
}

export function select(options: { value: string; label: string }[], value: string, onChange: (v: string) => void,
  label: string): HTMLSelectElement {
  const s = h("select", { attrs: { "aria-label": label } });
  for (const o of options) {
    const opt = h("option", { text: o.label });
    opt.value = o.value;
    s.append(opt);
  }
  s.value = value;
  s.addEventListener("change", () => onChange(s.value));
  return s;
}

export function download(name: string, blob: Blob): void {
  const url = URL.createObjectURL(blob);
  const a = h("a", { attrs: { download: name } });
  a.href = url;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** Spinner + text, or an error/empty message: the page always says what is going on. */
export function status(kind: "loading" | "error" | "empty", message: string, action?: { label: string; run: () => void }): HTMLElement {
  return h("div", { class: `ce-status ce-status-${kind}`, attrs: { role: kind === "error" ? "alert" : "status" } }, [
    kind === "loading" ? h("span", { class: "ce-spinner", attrs: { "aria-hidden": "true" } }) : null,
    h("span", { class: "ce-status-text", text: message }),
    action ? h("button", { class: "ce-button", text: action.label, on: { click: action.run } }) : null,
  ]);
}
