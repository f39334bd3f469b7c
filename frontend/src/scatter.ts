/**
 * The concept-map scatter: WebGL points (one draw call, buffers uploaded once per
 * data change, only uniforms per frame) with a Canvas-2D fallback, a 2-D overlay
 * for anchors, hover ring, trajectories and selection shapes, and pan / zoom /
 * box / lasso interaction.  Several views can share one {@link Camera}: that is the
 * linked zoom of the small multiples.
 */
import { Bounds, PointGrid, Transition, easeInOut, selectInPolygon, starVertices } from "./data";

export type Tool = "pan" | "box" | "lasso";

/** Shared view transform: data (cx, cy) at the viewport centre, `k` pixels per unit. */
export class Camera {
  cx = 0;
  cy = 0;
  k = 1;
  fitted = false;
  private listeners = new Set<() => void>();

  onChange(f: () => void): () => void {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  changed(): void {
    for (const f of this.listeners) f();
  }

  /** Show `b` in a width x height view, keeping `margin` pixels free (labels, stars). */
  fit(b: Bounds, width: number, height: number, margin = 18): void {
    this.cx = (b.minX + b.maxX) / 2;
    this.cy = (b.minY + b.maxY) / 2;
    const w = Math.max(width - 2 * margin, 10), h = Math.max(height - 2 * margin, 10);
    this.k = Math.min(w / Math.max(b.maxX - b.minX, 1e-9), h / Math.max(b.maxY - b.minY, 1e-9));
    this.fitted = true;
    this.changed();
  }
}

/** Map colours of the light and dark themes (the WebGL clear colour cannot read CSS). */
export const MAP_THEME = { dark: false };
const mapBackground = (): [number, number, number] => (MAP_THEME.dark ? [0.13, 0.13, 0.14] : [1, 1, 1]);
const ink = (light: string, dark: string) => (MAP_THEME.dark ? dark : light);

export interface Overlay {
  anchors: { x: number; y: number; label: string; kind: string }[];
  showAnchors: boolean;
  /** neuron trajectory in data coordinates (null = not placed at that step) */
  trajectory: { x: number | null; y: number | null; step: number; current: boolean }[] | null;
  /** point drawn with a ring (hover, linked across views) */
  ringAt: [number, number] | null;
  /** point drawn with a second ring (clicked neuron) */
  pinnedAt: [number, number] | null;
  /** fading trails: each neuron's places at the last few steps (oldest first), data coordinates, NaN = absent */
  trails: Float32Array[] | null;
}

export interface ScatterCallbacks {
  hover(index: number, clientX: number, clientY: number): void;
  click(index: number): void;
  select(indices: number[]): void;
  key?(e: KeyboardEvent): void;
}

const VERTEX = `
attribute vec2 a_pos;
attribute vec4 a_col;
attribute float a_emph;
attribute vec2 a_from;
attribute float a_fade;
uniform float u_t;
uniform vec2 u_center;
uniform vec2 u_scale;
uniform float u_size;
uniform float u_emphasis;
uniform float u_alpha;
varying vec4 v_col;
void main() {
  // Step transition: glide from the old place (u_t eased 0 -> 1); new points fade in, gone ones out.
  vec2 p = mix(a_from, a_pos, u_t);
  gl_Position = vec4((p - u_center) * u_scale, 0.0, 1.0);
  float emph = a_emph * u_emphasis;
  gl_PointSize = u_size * (1.0 + 0.8 * emph);
  float alpha = u_emphasis > 0.5 ? (emph > 0.5 ? 1.0 : 0.18) : u_alpha;
  float fade = a_fade < 0.5 ? 1.0 : (a_fade < 1.5 ? u_t : 1.0 - u_t);
  v_col = vec4(a_col.rgb, a_col.a * alpha * fade);
}`;

/** A still, dense map (no glide, no emphasis, square dots): the least work per point. */
const STILL_VERTEX = `
attribute vec2 a_pos;
attribute vec4 a_col;
uniform vec2 u_center;
uniform vec2 u_scale;
uniform float u_size;
varying vec4 v_col;
void main() {
  gl_Position = vec4((a_pos - u_center) * u_scale, 0.0, 1.0);
  gl_PointSize = u_size;
  v_col = a_col;
}`;

const STILL_FRAGMENT = `
precision mediump float;
varying vec4 v_col;
void main() { gl_FragColor = vec4(v_col.rgb * v_col.a, v_col.a); }`;

const FRAGMENT = `
precision mediump float;
uniform float u_round;
varying vec4 v_col;
void main() {
  // Dense maps draw tiny points: squares there, skipping per-fragment work.
  if (u_round < 0.5) { gl_FragColor = vec4(v_col.rgb * v_col.a, v_col.a); return; }
  vec2 d = gl_PointCoord - vec2(0.5);
  float r = length(d) * 2.0;
  if (r > 1.0) discard;
  float edge = 1.0 - smoothstep(0.75, 1.0, r);
  gl_FragColor = vec4(v_col.rgb * v_col.a * edge, v_col.a * edge);
}`;

/** Base point diameter in CSS pixels for a map of n points (dense maps get smaller dots). */
export function pointSize(n: number): number {
  if (n <= 2000) return 8;
  if (n <= 20000) return 5;
  // Dense maps: 3 px squares.  Software GL (no GPU, as in many remote sessions) pays per
  // covered pixel: 3.5 px dots cost ~20 % more per frame than 3 px ones on 26k points.
  return 3;
}

/** The program of square dots without emphasis or fades. */
interface PlainProgram {
  program: WebGLProgram; pos: number; col: number; center: WebGLUniformLocation;
  scale: WebGLUniformLocation; size: WebGLUniformLocation;
}

export class ScatterView {
  readonly element: HTMLDivElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly overlayCanvas: HTMLCanvasElement;
  private gl: WebGLRenderingContext | null = null;
  private ctx2d: CanvasRenderingContext2D | null = null;
  private program: WebGLProgram | null = null;
  private still: PlainProgram | null = null;
  private buffers: { pos: WebGLBuffer; col: WebGLBuffer; emph: WebGLBuffer; from: WebGLBuffer; fade: WebGLBuffer;
    now: WebGLBuffer } | null = null;
  /** this frame's places of a dense glide, interpolated here and drawn with the still program */
  private glidePositions: Float32Array = new Float32Array(0);
  private loc: { pos: number; col: number; emph: number; from: number; fade: number; t: WebGLUniformLocation;
    center: WebGLUniformLocation; scale: WebGLUniformLocation; size: WebGLUniformLocation; emphasis: WebGLUniformLocation;
    alpha: WebGLUniformLocation; round: WebGLUniformLocation } | null = null;
  /** running step transition: points glide from `from`; `extra` vanishing points drawn after the n live ones */
  private anim: { from: Float32Array; fade: Uint8Array; start: number; duration: number; extra: number;
    vanish: Float32Array; vanishColours: Uint8Array; fades: boolean } | null = null;
  /** tests hold a transition at a fixed progress to look at an intermediate frame */
  static holdAt: number | null = null;
  private positions: Float32Array = new Float32Array(0);
  private colours: Uint8Array = new Uint8Array(0);
  private emphasis: Uint8Array | null = null;
  private grid: PointGrid | null = null;
  private frame = 0;
  private width = 1;
  private height = 1;
  private dpr = 1;
  private drag: { x: number; y: number; cx: number; cy: number; moved: boolean; tool: Tool; path: number[] } | null = null;
  private unsubscribe: () => void;
  private resizeObserver: ResizeObserver;
  overlay: Overlay = { anchors: [], showAnchors: true, trajectory: null, ringAt: null, pinnedAt: null, trails: null };
  tool: Tool = "pan";
  /** last frame's timestamp, read by benchmarks and tests */
  drawCount = 0;
  readonly renderer: "webgl" | "canvas";

  constructor(readonly camera: Camera, private readonly callbacks: ScatterCallbacks, forceCanvas = false) {
    this.element = document.createElement("div");
    this.element.className = "ce-scatter";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "ce-scatter-points";
    this.overlayCanvas = document.createElement("canvas");
    this.overlayCanvas.className = "ce-scatter-overlay";
    this.overlayCanvas.tabIndex = 0;
    this.overlayCanvas.setAttribute("role", "application");
    this.overlayCanvas.setAttribute("aria-roledescription", "concept map");
    this.element.append(this.canvas, this.overlayCanvas);
    if (!forceCanvas) this.initGl();
    if (!this.gl) this.ctx2d = this.canvas.getContext("2d");
    this.renderer = this.gl ? "webgl" : "canvas";
    this.element.dataset.renderer = this.renderer;
    this.unsubscribe = camera.onChange(() => this.requestDraw());
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.element);
    this.bindEvents();
  }

  private initGl(): void {
    let gl: WebGLRenderingContext | null = null;
    try {
      // Opaque canvas: the compositor need not blend it with what lies below (a large
      // saving with software compositing).
      gl = this.canvas.getContext("webgl", { antialias: false, premultipliedAlpha: true, alpha: false,
        preserveDrawingBuffer: false, powerPreference: "high-performance" }) as WebGLRenderingContext | null;
    } catch {
      gl = null;
    }
    if (!gl) return;
    const compile = (type: number, src: string) => {
      const s = gl!.createShader(type)!;
      gl!.shaderSource(s, src);
      gl!.compileShader(s);
      if (!gl!.getShaderParameter(s, gl!.COMPILE_STATUS)) throw new Error(gl!.getShaderInfoLog(s) || "shader error");
      return s;
    };
    const link = (vertex: string, fragment: string) => {
      const program = gl!.createProgram()!;
      gl!.attachShader(program, compile(gl!.VERTEX_SHADER, vertex));
      gl!.attachShader(program, compile(gl!.FRAGMENT_SHADER, fragment));
      gl!.bindAttribLocation(program, 0, "a_pos"); // attribute 0 always an array (drivers' fast path)
      gl!.linkProgram(program);
      if (!gl!.getProgramParameter(program, gl!.LINK_STATUS)) throw new Error(gl!.getProgramInfoLog(program) || "link error");
      return program;
    };
    try {
      const program = link(VERTEX, FRAGMENT);
      const still = link(STILL_VERTEX, STILL_FRAGMENT);
      this.still = { program: still, pos: gl.getAttribLocation(still, "a_pos"), col: gl.getAttribLocation(still, "a_col"),
        center: gl.getUniformLocation(still, "u_center")!, scale: gl.getUniformLocation(still, "u_scale")!,
        size: gl.getUniformLocation(still, "u_size")! };
      this.program = program;
      this.loc = {
        pos: gl.getAttribLocation(program, "a_pos"),
        col: gl.getAttribLocation(program, "a_col"),
        emph: gl.getAttribLocation(program, "a_emph"),
        from: gl.getAttribLocation(program, "a_from"),
        fade: gl.getAttribLocation(program, "a_fade"),
        t: gl.getUniformLocation(program, "u_t")!,
        center: gl.getUniformLocation(program, "u_center")!,
        scale: gl.getUniformLocation(program, "u_scale")!,
        size: gl.getUniformLocation(program, "u_size")!,
        emphasis: gl.getUniformLocation(program, "u_emphasis")!,
        alpha: gl.getUniformLocation(program, "u_alpha")!,
        round: gl.getUniformLocation(program, "u_round")!,
      };
      this.buffers = { pos: gl.createBuffer()!, col: gl.createBuffer()!, emph: gl.createBuffer()!, from: gl.createBuffer()!,
        fade: gl.createBuffer()!, now: gl.createBuffer()! };
      this.gl = gl;
      this.warmUp();
    } catch {
      this.gl = null; // broken driver: fall back to Canvas 2-D
    }
  }

  /** Software GL compiles its pipeline at the first draw: do it now, while data loads. */
  private warmUp(): void {
    this.setData(new Float32Array([0, 0]), new Uint8Array([255, 255, 255, 0]));
    this.draw();
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.drawCount = 0;
    this.positions = new Float32Array(0);
    this.colours = new Uint8Array(0);
  }

  destroy(): void {
    cancelAnimationFrame(this.frame);
    this.unsubscribe();
    this.resizeObserver.disconnect();
    const lose = this.gl?.getExtension("WEBGL_lose_context");
    lose?.loseContext();
    this.element.remove();
  }

  get pointCount(): number {
    return this.positions.length / 2;
  }

  /**
   * New points and colours.  With a `transition` (a step change) the points glide from
   * their old places over `duration` ms, eased; new ones fade in, vanished ones fade out.
   */
  setData(positions: Float32Array, rgba: Uint8Array, transition?: { t: Transition; colours: Uint8Array; duration: number }): void {
    const samePositions = positions === this.positions && !transition;
    this.positions = positions;
    this.colours = rgba;
    if (!samePositions) {
      this.grid = null; // built lazily on first hover: first draw must not wait for it
      this.emphasis = null;
    }
    const n = positions.length / 2;
    if (transition && transition.duration > 0) {
      const { t } = transition;
      const extra = t.vanishIndex.length;
      const vanishColours = new Uint8Array(extra * 4);
      t.vanishIndex.forEach((j, k) => vanishColours.set(transition.colours.subarray(4 * j, 4 * j + 4), 4 * k));
      this.anim = { from: t.from, fade: t.fade, start: performance.now(), duration: transition.duration, extra,
        vanish: t.vanishPositions, vanishColours, fades: extra > 0 || t.fade.some((f) => f !== 0) };
    } else if (!samePositions) {
      this.anim = null;
    }
    const gl = this.gl;
    if (gl && this.buffers) {
      const a = this.anim;
      const extra = a ? a.extra : 0;
      if (!samePositions) {
        const pos = new Float32Array((n + extra) * 2);
        pos.set(positions);
        if (a) pos.set(a.vanish, 2 * n);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.pos);
        gl.bufferData(gl.ARRAY_BUFFER, pos, gl.STATIC_DRAW);
        const from = new Float32Array((n + extra) * 2);
        if (a) { from.set(a.from); from.set(a.vanish, 2 * n); } else from.set(positions);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.from);
        gl.bufferData(gl.ARRAY_BUFFER, from, gl.STATIC_DRAW);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.fade);
        gl.bufferData(gl.ARRAY_BUFFER, a ? a.fade : new Uint8Array(n), gl.STATIC_DRAW);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.emph);
        gl.bufferData(gl.ARRAY_BUFFER, new Uint8Array(n + extra), gl.DYNAMIC_DRAW);
      }
      const col = new Uint8Array((n + extra) * 4);
      col.set(rgba);
      if (a && extra && !samePositions) col.set(a.vanishColours, 4 * n);
      gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.col);
      gl.bufferData(gl.ARRAY_BUFFER, col, gl.STATIC_DRAW);
    }
    this.requestDraw();
  }

  /** Progress of the running transition, eased (1 when none runs). */
  private progress(now = performance.now()): number {
    const a = this.anim;
    if (!a) return 1;
    const raw = ScatterView.holdAt ?? (now - a.start) / a.duration;
    return raw >= 1 ? 1 : easeInOut(raw);
  }

  /** True while a step transition is drawing intermediate frames. */
  get animating(): boolean {
    return this.progress() < 1;
  }

  /** Dense, plain frames (square dots, nothing emphasised or fading): the still program,
   * a glide's places interpolated on the CPU. */
  private plainFrame(): boolean {
    return pointSize(this.pointCount) * this.zoomFactor() * this.dpr <= 4.5 && !this.emphasis && !this.anim?.fades;
  }

  /** True while a glide is drawn on the dense path (read by tests and benchmarks). */
  get plainGlide(): boolean {
    return this.anim !== null && this.plainFrame();
  }

  /** The running glide's start and end places and the colours (read by tests). */
  glideEnds(): { from: Float32Array; to: Float32Array; colours: Uint8Array } {
    return { from: this.anim ? this.anim.from : this.positions, to: this.positions, colours: this.colours };
  }

  /** Highlight these point indices (dimming the rest); null clears. */
  setEmphasis(indices: Iterable<number> | null): void {
    const n = this.pointCount;
    let flags: Uint8Array | null = null;
    if (indices) {
      flags = new Uint8Array(n);
      let any = false;
      for (const i of indices) if (i >= 0 && i < n) { flags[i] = 1; any = true; }
      if (!any) flags = new Uint8Array(n); // everything dimmed: nothing matched
    }
    this.emphasis = flags;
    const gl = this.gl;
    if (gl && this.buffers) {
      const all = new Uint8Array(n + (this.anim?.extra ?? 0));
      if (flags) all.set(flags);
      gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.emph);
      gl.bufferData(gl.ARRAY_BUFFER, all, gl.DYNAMIC_DRAW);
    }
    this.requestDraw();
  }

  requestDraw(): void {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  /** Accessible name of the map (its keyboard use included). */
  setLabel(text: string): void {
    this.overlayCanvas.setAttribute("aria-label", text);
  }

  /** Keyboard focus on the map. */
  focus(): void {
    this.overlayCanvas.focus();
  }

  /** Re-read the element's size now (a new view is measured before its first fit). */
  resize(): void {
    const rect = this.element.getBoundingClientRect();
    this.dpr = window.devicePixelRatio || 1;
    this.width = Math.max(1, Math.round(rect.width));
    this.height = Math.max(1, Math.round(rect.height));
    for (const c of [this.canvas, this.overlayCanvas]) {
      c.width = Math.round(this.width * this.dpr);
      c.height = Math.round(this.height * this.dpr);
    }
    this.overlayBlank = true; // resizing clears a canvas
    this.requestDraw();
  }

  get size(): { width: number; height: number } {
    return { width: this.width, height: this.height };
  }

  toScreen(x: number, y: number): [number, number] {
    const c = this.camera;
    return [this.width / 2 + (x - c.cx) * c.k, this.height / 2 - (y - c.cy) * c.k];
  }

  toData(sx: number, sy: number): [number, number] {
    const c = this.camera;
    return [c.cx + (sx - this.width / 2) / c.k, c.cy - (sy - this.height / 2) / c.k];
  }

  private zoomFactor(): number {
    return 1;
  }

  /** called once, right after the first frame that drew points */
  onFirstPoints: (() => void) | null = null;

  draw(): void {
    this.drawCount++;
    const n = this.pointCount;
    const t = this.progress();
    if (this.anim && t >= 1 && ScatterView.holdAt === null) this.anim = null;
    if (this.anim) this.requestDraw(); // next intermediate frame
    if (n && this.onFirstPoints) {
      const f = this.onFirstPoints;
      this.onFirstPoints = null;
      queueMicrotask(f);
    }
    const size = pointSize(n) * this.zoomFactor();
    const c = this.camera;
    if (this.gl && this.program && this.loc && this.buffers) {
      const gl = this.gl;
      gl.viewport(0, 0, this.canvas.width, this.canvas.height);
      const [br, bg, bb] = mapBackground();
      gl.clearColor(br, bg, bb, 1);
      gl.clear(gl.COLOR_BUFFER_BIT);
      const pixels = size * this.dpr;
      const round = pixels > 4.5;
      const plain = this.plainFrame() ? this.still : null;
      if (n && plain) {
        // The common cases of a dense map, still or gliding: two attributes, no
        // per-fragment branch, no blending.  A glide's places are interpolated here
        // (n multiply-adds, one buffer upload): software GL pays per attribute fetched
        // per point, so a third attribute and a mix per vertex cost more per frame.
        let positions = this.buffers.pos;
        if (this.anim) {
          if (this.glidePositions.length !== 2 * n) this.glidePositions = new Float32Array(2 * n);
          const now = this.glidePositions, from = this.anim.from, to = this.positions;
          for (let i = 0; i < 2 * n; i++) now[i] = from[i] + (to[i] - from[i]) * t;
          positions = this.buffers.now;
          gl.bindBuffer(gl.ARRAY_BUFFER, positions);
          gl.bufferData(gl.ARRAY_BUFFER, now, gl.STREAM_DRAW);
        }
        gl.useProgram(plain.program);
        gl.disable(gl.BLEND);
        for (const location of [this.loc.emph, this.loc.from, this.loc.fade]) gl.disableVertexAttribArray(location);
        for (const [location, buffer, width, type, normalised] of [[plain.pos, positions, 2, gl.FLOAT, false],
          [plain.col, this.buffers.col, 4, gl.UNSIGNED_BYTE, true]] as const) {
          gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
          gl.enableVertexAttribArray(location);
          gl.vertexAttribPointer(location, width, type, normalised, 0, 0);
        }
        gl.uniform2f(plain.center, c.cx, c.cy);
        gl.uniform2f(plain.scale, (2 * c.k) / this.width, (2 * c.k) / this.height);
        gl.uniform1f(plain.size, pixels);
        gl.drawArrays(gl.POINTS, 0, n);
      } else if (n) {
        gl.useProgram(this.program);
        // Blending only when something is translucent (round edges, dimmed points).
        if (round || this.emphasis || this.anim?.fades) {
          gl.enable(gl.BLEND);
          gl.blendFunc(gl.ONE, gl.ONE_MINUS_SRC_ALPHA);
        } else {
          gl.disable(gl.BLEND);
        }
        gl.uniform1f(this.loc.round, round ? 1 : 0);
        gl.uniform1f(this.loc.alpha, round ? 0.9 : 1);
        const buffers = this.buffers;
        const attribute = (location: number, buffer: WebGLBuffer, size: number, type: number, normalised: boolean) => {
          gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
          gl.enableVertexAttribArray(location);
          gl.vertexAttribPointer(location, size, type, normalised, 0, 0);
        };
        attribute(this.loc.pos, buffers.pos, 2, gl.FLOAT, false);
        attribute(this.loc.col, buffers.col, 4, gl.UNSIGNED_BYTE, true);
        // Only the arrays this frame needs: without emphasis, glide or fades their
        // attributes are constants (software GL fetches every enabled array for every
        // point, every frame).
        const constant = (location: number, ...value: number[]) => {
          gl.disableVertexAttribArray(location);
          if (value.length === 2) gl.vertexAttrib2f(location, value[0], value[1]);
          else gl.vertexAttrib1f(location, value[0]);
        };
        if (this.emphasis) attribute(this.loc.emph, buffers.emph, 1, gl.UNSIGNED_BYTE, false);
        else constant(this.loc.emph, 0);
        if (this.anim) attribute(this.loc.from, buffers.from, 2, gl.FLOAT, false);
        else constant(this.loc.from, 0, 0); // unused at u_t = 1
        if (this.anim?.fades) attribute(this.loc.fade, buffers.fade, 1, gl.UNSIGNED_BYTE, false);
        else constant(this.loc.fade, 0);
        gl.uniform1f(this.loc.t, this.anim ? t : 1);
        gl.uniform2f(this.loc.center, c.cx, c.cy);
        gl.uniform2f(this.loc.scale, (2 * c.k) / this.width, (2 * c.k) / this.height);
        gl.uniform1f(this.loc.size, size * this.dpr);
        gl.uniform1f(this.loc.emphasis, this.emphasis ? 1 : 0);
        gl.drawArrays(gl.POINTS, 0, n + (this.anim ? this.anim.extra : 0));
      }
    } else if (this.ctx2d) {
      this.draw2d(size, this.anim ? t : 1);
    }
    this.drawOverlay(size);
  }

  private draw2d(size: number, t: number): void {
    const ctx = this.ctx2d!;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    const [br, bg, bb] = mapBackground();
    ctx.fillStyle = `rgb(${br * 255},${bg * 255},${bb * 255})`;
    ctx.fillRect(0, 0, this.width, this.height);
    const n = this.pointCount;
    const r = size / 2;
    const a = this.anim;
    const col = this.colours;
    const emph = this.emphasis;
    // Points of one colour (and fade) are drawn in one path: far fewer state changes than per point.
    const byColour = new Map<number, number[]>();
    const add = (x: number, y: number, rgb: number, e: number, fade: number) => {
      const [sx, sy] = this.toScreen(x, y);
      if (sx < -r || sy < -r || sx > this.width + r || sy > this.height + r) return;
      const key = (rgb * 4 + e) * 3 + fade;
      let list = byColour.get(key);
      if (!list) byColour.set(key, (list = []));
      list.push(sx, sy);
    };
    for (let i = 0; i < n; i++) {
      let x = this.positions[2 * i], y = this.positions[2 * i + 1];
      if (a && t < 1) { x = a.from[2 * i] + (x - a.from[2 * i]) * t; y = a.from[2 * i + 1] + (y - a.from[2 * i + 1]) * t; }
      add(x, y, (col[4 * i] << 16) | (col[4 * i + 1] << 8) | col[4 * i + 2], emph ? (emph[i] ? 2 : 1) : 0, a && t < 1 ? a.fade[i] : 0);
    }
    if (a && t < 1) {
      for (let k = 0; k < a.extra; k++) {
        const c = a.vanishColours;
        add(a.vanish[2 * k], a.vanish[2 * k + 1], (c[4 * k] << 16) | (c[4 * k + 1] << 8) | c[4 * k + 2], emph ? 1 : 0, 2);
      }
    }
    for (const [key, list] of byColour) {
      const fade = key % 3;
      const e = Math.floor(key / 3) % 4;
      const rgb = Math.floor(key / 12);
      const f = fade === 1 ? t : fade === 2 ? 1 - t : 1;
      ctx.globalAlpha = (e === 1 ? 0.18 : e === 2 ? 1 : 0.9) * f;
      ctx.fillStyle = `rgb(${(rgb >> 16) & 255},${(rgb >> 8) & 255},${rgb & 255})`;
      const rr = e === 2 ? r * 1.8 : r;
      ctx.beginPath();
      for (let j = 0; j < list.length; j += 2) {
        ctx.moveTo(list[j] + rr, list[j + 1]);
        ctx.arc(list[j], list[j + 1], rr, 0, Math.PI * 2);
      }
      ctx.fill();
    }
    ctx.globalAlpha = 1;
  }

  private overlayBlank = true;

  private overlayHasContent(): boolean {
    const o = this.overlay;
    return !!((o.trajectory && o.trajectory.length) || (o.trails && o.trails.length) || (o.showAnchors && o.anchors.length) || o.ringAt || o.pinnedAt ||
      (this.drag && this.drag.tool !== "pan"));
  }

  private drawOverlay(size: number): void {
    // An untouched overlay costs nothing to composite: skip it while it stays empty.
    const hasContent = this.overlayHasContent();
    if (!hasContent && this.overlayBlank) return;
    const ctx = this.overlayCanvas.getContext("2d")!;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    this.overlayBlank = !hasContent;
    const o = this.overlay;
    if (o.trails && o.trails.length) this.drawTrails(ctx, o.trails);
    if (o.trajectory && o.trajectory.length) {
      ctx.lineWidth = 2;
      ctx.strokeStyle = ink("rgba(33,33,33,0.75)", "rgba(238,238,238,0.8)");
      ctx.setLineDash([]);
      ctx.beginPath();
      let pen = false;
      for (const p of o.trajectory) {
        if (p.x === null || p.y === null) { pen = false; continue; }
        const [sx, sy] = this.toScreen(p.x, p.y);
        if (pen) ctx.lineTo(sx, sy); else ctx.moveTo(sx, sy);
        pen = true;
      }
      ctx.stroke();
      o.trajectory.forEach((p, i) => {
        if (p.x === null || p.y === null) return;
        const [sx, sy] = this.toScreen(p.x, p.y);
        ctx.beginPath();
        ctx.arc(sx, sy, p.current ? 5 : 3, 0, Math.PI * 2);
        ctx.fillStyle = p.current ? "#f57c00" : i === 0 ? ink("#ffffff", "#212124") : ink("#424242", "#e0e0e0");
        ctx.strokeStyle = ink("#424242", "#e0e0e0");
        ctx.lineWidth = 1.5;
        ctx.fill();
        ctx.stroke();
      });
      const last = o.trajectory.filter((p) => p.x !== null)[0];
      if (last && last.x !== null && last.y !== null) {
        const [sx, sy] = this.toScreen(last.x, last.y);
        label(ctx, `step ${last.step}`, sx + 6, sy - 6, ink("#424242", "#e0e0e0"));
      }
    }
    if (o.showAnchors) {
      ctx.font = "500 11px Roboto, 'Helvetica Neue', Arial, sans-serif";
      const shown: { a: (typeof o.anchors)[number]; sx: number; sy: number }[] = [];
      for (const a of o.anchors) {
        const [sx, sy] = this.toScreen(a.x, a.y);
        if (sx < -40 || sy < -20 || sx > this.width + 40 || sy > this.height + 20) continue;
        shown.push({ a, sx, sy });
        const v = starVertices(sx, sy, a.kind === "anchor" ? 7 : 5);
        ctx.beginPath();
        for (let i = 0; i < v.length; i += 2) (i ? ctx.lineTo : ctx.moveTo).call(ctx, v[i], v[i + 1]);
        ctx.closePath();
        ctx.fillStyle = a.kind === "anchor" ? "#f57c00" : "#ffb74d";
        ctx.strokeStyle = "#ffffff";
        ctx.lineWidth = 1.2;
        ctx.fill();
        ctx.stroke();
      }
      for (const l of placeLabels(ctx, shown.map(({ a, sx, sy }) => ({ text: a.label, x: sx, y: sy })), this.width, this.height)) {
        label(ctx, l.text, l.x, l.y, ink("#5d4037", "#ffcc80"));
      }
    }
    for (const [at, colour, radius] of [[o.pinnedAt, ink("#212121", "#fafafa"), size / 2 + 6], [o.ringAt, "#f57c00", size / 2 + 4]] as const) {
      if (!at) continue;
      const [sx, sy] = this.toScreen(at[0], at[1]);
      ctx.beginPath();
      ctx.arc(sx, sy, radius, 0, Math.PI * 2);
      ctx.lineWidth = 2.5;
      ctx.strokeStyle = colour;
      ctx.stroke();
    }
    const d = this.drag;
    if (d && d.tool !== "pan" && d.path.length >= 4) {
      ctx.beginPath();
      if (d.tool === "box") {
        const [x0, y0] = [d.path[0], d.path[1]];
        const [x1, y1] = [d.path[d.path.length - 2], d.path[d.path.length - 1]];
        ctx.rect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
      } else {
        for (let i = 0; i < d.path.length; i += 2) (i ? ctx.lineTo : ctx.moveTo).call(ctx, d.path[i], d.path[i + 1]);
        ctx.closePath();
      }
      ctx.fillStyle = "rgba(245,124,0,0.08)";
      ctx.fill();
      ctx.setLineDash([4, 3]);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#f57c00";
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  /** Fading trails: segments from each neuron's older places to its next, older = fainter; ends at the current place. */
  private drawTrails(ctx: CanvasRenderingContext2D, trails: Float32Array[]): void {
    const all = [...trails, this.positions];
    ctx.lineWidth = 1;
    for (let s = 0; s + 1 < all.length; s++) {
      const a = all[s], b = all[s + 1];
      ctx.strokeStyle = ink(`rgba(66,66,66,${(0.12 + (0.4 * (s + 1)) / all.length).toFixed(2)})`,
        `rgba(230,230,230,${(0.12 + (0.4 * (s + 1)) / all.length).toFixed(2)})`);
      ctx.beginPath();
      const m = Math.min(a.length, b.length) / 2;
      for (let i = 0; i < m; i++) {
        const x0 = a[2 * i], y0 = a[2 * i + 1], x1 = b[2 * i], y1 = b[2 * i + 1];
        if (!Number.isFinite(x0) || !Number.isFinite(x1)) continue;
        const [p, q] = this.toScreen(x0, y0), [u, v] = this.toScreen(x1, y1);
        ctx.moveTo(p, q);
        ctx.lineTo(u, v);
      }
      ctx.stroke();
    }
  }

  /** Index of the placed point under the pointer (screen px relative to the view), or -1. */
  pick(sx: number, sy: number): number {
    if (!this.pointCount) return -1;
    if (!this.grid) this.grid = new PointGrid(this.positions);
    const [x, y] = this.toData(sx, sy);
    const radius = Math.max(6, pointSize(this.pointCount)) / this.camera.k;
    return this.grid.nearest(x, y, radius);
  }

  pointScreen(index: number): [number, number] | null {
    if (index < 0 || index >= this.pointCount) return null;
    return this.toScreen(this.positions[2 * index], this.positions[2 * index + 1]);
  }

  private bindEvents(): void {
    const el = this.overlayCanvas;
    el.addEventListener("keydown", (e) => this.callbacks.key?.(e));
    const local = (e: MouseEvent): [number, number] => {
      const r = el.getBoundingClientRect();
      return [e.clientX - r.left, e.clientY - r.top];
    };
    el.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [sx, sy] = local(e);
      const [x, y] = this.toData(sx, sy);
      const factor = Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015));
      const c = this.camera;
      c.k = Math.min(Math.max(c.k * factor, 1e-6), 1e9);
      // keep the data point under the cursor fixed
      c.cx = x - (sx - this.width / 2) / c.k;
      c.cy = y + (sy - this.height / 2) / c.k;
      c.changed();
    }, { passive: false });
    el.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      el.setPointerCapture(e.pointerId);
      const [sx, sy] = local(e);
      const tool: Tool = e.shiftKey ? "box" : e.altKey ? "lasso" : this.tool;
      this.drag = { x: sx, y: sy, cx: this.camera.cx, cy: this.camera.cy, moved: false, tool, path: [sx, sy] };
    });
    el.addEventListener("pointermove", (e) => {
      const [sx, sy] = local(e);
      const d = this.drag;
      if (d) {
        if (Math.abs(sx - d.x) + Math.abs(sy - d.y) > 3) d.moved = true;
        if (d.tool === "pan") {
          this.camera.cx = d.cx - (sx - d.x) / this.camera.k;
          this.camera.cy = d.cy + (sy - d.y) / this.camera.k;
          this.camera.changed();
        } else {
          d.path.push(sx, sy);
          this.requestDraw();
        }
        return;
      }
      this.callbacks.hover(this.pick(sx, sy), e.clientX, e.clientY);
    });
    el.addEventListener("pointerleave", () => {
      if (!this.drag) this.callbacks.hover(-1, 0, 0);
    });
    const finish = (e: PointerEvent) => {
      const d = this.drag;
      if (!d) return;
      this.drag = null;
      const [sx, sy] = local(e);
      if (!d.moved) {
        this.callbacks.click(this.pick(sx, sy));
      } else if (d.tool !== "pan") {
        let poly: number[];
        if (d.tool === "box") {
          const [x0, y0] = [d.path[0], d.path[1]];
          poly = [x0, y0, sx, y0, sx, sy, x0, sy];
        } else {
          poly = d.path;
        }
        const dataPoly: number[] = [];
        for (let i = 0; i < poly.length; i += 2) dataPoly.push(...this.toData(poly[i], poly[i + 1]));
        this.callbacks.select(selectInPolygon(this.positions, dataPoly));
      }
      this.requestDraw();
    };
    el.addEventListener("pointerup", finish);
    el.addEventListener("pointercancel", () => { this.drag = null; this.requestDraw(); });
  }

  /** The map as it is on screen (points + overlay) as a PNG blob, on a white background. */
  async toPngBlob(): Promise<Blob> {
    this.draw(); // the WebGL buffer is only readable in the frame it was drawn in
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const ctx = out.getContext("2d")!;
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.canvas, 0, 0);
    ctx.drawImage(this.overlayCanvas, 0, 0);
    return new Promise((resolve, reject) => out.toBlob((b) => (b ? resolve(b) : reject(new Error("PNG export failed"))), "image/png"));
  }

  /** Screen-space points for SVG export (only those in view). */
  screenPoints(): { x: number; y: number; i: number }[] {
    const out: { x: number; y: number; i: number }[] = [];
    for (let i = 0; i < this.pointCount; i++) {
      const [x, y] = this.toScreen(this.positions[2 * i], this.positions[2 * i + 1]);
      if (x >= 0 && y >= 0 && x <= this.width && y <= this.height) out.push({ x, y, i });
    }
    return out;
  }

  get colourBytes(): Uint8Array {
    return this.colours;
  }
}

/**
 * Greedy label placement for anchor stars: right of the star, else left, above, below;
 * a label that would overlap an earlier one or a star, or leave the view, is dropped
 * (the star stays; the anchor words are also in the search and the SVG export).
 */
export function placeLabels(ctx: CanvasRenderingContext2D, items: { text: string; x: number; y: number }[], width: number,
  height: number): { text: string; x: number; y: number }[] {
  const boxes: [number, number, number, number][] = items.map(({ x, y }) => [x - 6, y - 6, x + 6, y + 6]);
  const out: { text: string; x: number; y: number }[] = [];
  const free = (b: [number, number, number, number], self: number) => b[0] >= 1 && b[1] >= 1 && b[2] <= width - 1 &&
    b[3] <= height - 1 && boxes.every((o, j) => j === self || b[2] <= o[0] || b[0] >= o[2] || b[3] <= o[1] || b[1] >= o[3]);
  items.forEach(({ text, x, y }, i) => {
    const w = ctx.measureText(text).width, hgt = 11;
    // candidate baselines: right, left, above, below
    for (const [lx, ly] of [[x + 9, y + 4], [x - 9 - w, y + 4], [x - w / 2, y - 9], [x - w / 2, y + 9 + hgt]]) {
      const box: [number, number, number, number] = [lx - 1, ly - hgt + 1, lx + w + 1, ly + 3];
      if (free(box, i)) {
        boxes.push(box);
        out.push({ text, x: lx, y: ly });
        break;
      }
    }
  });
  return out;
}

function label(ctx: CanvasRenderingContext2D, text: string, x: number, y: number, colour: string): void {
  ctx.lineWidth = 3;
  ctx.strokeStyle = ink("rgba(255,255,255,0.9)", "rgba(33,33,36,0.9)");
  ctx.strokeText(text, x, y);
  ctx.fillStyle = colour;
  ctx.fillText(text, x, y);
}
