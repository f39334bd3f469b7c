/**
 * Light or dark, as TensorBoard is: its `body.dark-mode` class when the frame can see
 * TensorBoard's page (same origin), else the system's `prefers-color-scheme`.  The
 * root gets `data-theme`; maps and charts read {@link MAP_THEME}.
 */
import { MAP_THEME } from "./scatter";

function hostBody(): HTMLElement | null {
  try {
    return window.parent !== window ? window.parent.document.body : null;
  } catch {
    return null; // another origin
  }
}

export function isDark(): boolean {
  return MAP_THEME.dark;
}

export function followTheme(root: HTMLElement, changed: () => void): void {
  const media = window.matchMedia?.("(prefers-color-scheme: dark)");
  const host = hostBody();
  const apply = () => {
    const dark = host ? host.classList.contains("dark-mode") : !!media?.matches;
    if (dark === MAP_THEME.dark && root.dataset.theme) return;
    MAP_THEME.dark = dark;
    root.dataset.theme = dark ? "dark" : "light";
    document.documentElement.dataset.theme = root.dataset.theme;
    changed();
  };
  apply();
  if (host) new MutationObserver(apply).observe(host, { attributes: true, attributeFilter: ["class"] });
  media?.addEventListener?.("change", apply);
}
