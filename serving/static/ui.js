// fedseg web page: send one DICOM series to POST /v1/predict and show its slices with the
// predicted mask over them. Plain JavaScript, no build step, nothing fetched from elsewhere.
// The slices are read in the browser by a small DICOM reader (uncompressed little-endian
// syntaxes); for other syntaxes the mask is shown alone.
"use strict";

(() => {
  const IMPLICIT_LE = "1.2.840.10008.1.2";
  const EXPLICIT_LE = "1.2.840.10008.1.2.1";
  const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);
  const WANTED = {
    "00280002": "samples", "00280004": "photometric", "00280010": "rows", "00280011": "cols",
    "00280100": "bits", "00280103": "signed", "00281052": "intercept", "00281053": "slope",
    "00200013": "number", "00200032": "ipp", "00200037": "iop", "7FE00010": "pixels",
  };
  const UNDEFINED = 0xffffffff;

  const $ = (id) => document.getElementById(id);
  const view = { slices: null, mask: null, shape: null, lo: 0, hi: 1, invert: false };

  // ------------------------------------------------------------------ DICOM reading

  function ascii(dv, off, n) {
    let s = "";
    for (let i = 0; i < n && off + i < dv.byteLength; i++) s += String.fromCharCode(dv.getUint8(off + i));
    return s;
  }

  function key(g, e) {
    return (g.toString(16).padStart(4, "0") + e.toString(16).padStart(4, "0")).toUpperCase();
  }

  function header(dv, off, explicit) {
    const g = dv.getUint16(off, true), e = dv.getUint16(off + 2, true);
    if (g === 0xfffe) return { g, e, vr: null, len: dv.getUint32(off + 4, true), at: off + 8 };
    if (explicit) {
      const vr = ascii(dv, off + 4, 2);
      if (LONG_VRS.has(vr)) return { g, e, vr, len: dv.getUint32(off + 8, true), at: off + 12 };
      return { g, e, vr, len: dv.getUint16(off + 6, true), at: off + 8 };
    }
    return { g, e, vr: null, len: dv.getUint32(off + 4, true), at: off + 8 };
  }

  // Items of a sequence (or fragments of encapsulated pixel data) up to the sequence delimiter.
  function skipItems(dv, off, explicit) {
    for (;;) {
      const el = header(dv, off, explicit);
      if (el.g !== 0xfffe) throw new Error("malformed sequence");
      if (el.e === 0xe0dd) return el.at;
      if (el.len === UNDEFINED) off = walk(dv, el.at, dv.byteLength, explicit, null);
      else off = el.at + el.len;
    }
  }

  // Walks elements from off to end; records the wanted top-level ones in out (when given).
  function walk(dv, off, end, explicit, out) {
    while (off + 8 <= end) {
      const el = header(dv, off, explicit);
      if (el.g === 0xfffe && (el.e === 0xe00d || el.e === 0xe0dd)) return el.at;
      const name = out ? WANTED[key(el.g, el.e)] : undefined;
      if (el.len === UNDEFINED) {
        if (name === "pixels") out.encapsulated = true;
        off = skipItems(dv, el.at, explicit);
        continue;
      }
      if (name) out[name] = { at: el.at, len: el.len };
      off = el.at + el.len;
    }
    return off;
  }

  function numbers(dv, field) {
    if (!field) return null;
    return ascii(dv, field.at, field.len).replace(/\0/g, "").trim().split("\\").map(Number);
  }

  function parseDicom(buffer) {
    const dv = new DataView(buffer);
    let off = 0, syntax = IMPLICIT_LE;
    if (buffer.byteLength >= 132 && ascii(dv, 128, 4) === "DICM") {
      off = 132;
      while (off + 8 <= dv.byteLength && dv.getUint16(off, true) === 0x0002) {
        const el = header(dv, off, true);
        if (el.e === 0x0010) syntax = ascii(dv, el.at, el.len).replace(/\0/g, "").trim();
        off = el.at + el.len;
      }
    }
    const f = {};
    const readable = syntax === IMPLICIT_LE || syntax === EXPLICIT_LE;
    if (readable) walk(dv, off, dv.byteLength, syntax !== IMPLICIT_LE, f);
    const us = (x) => (x ? dv.getUint16(x.at, true) : null);
    const slice = {
      rows: us(f.rows), cols: us(f.cols), bits: us(f.bits) || 16, signed: us(f.signed) === 1,
      samples: us(f.samples) || 1, photometric: f.photometric ? ascii(dv, f.photometric.at, f.photometric.len).trim() : "",
      slope: (numbers(dv, f.slope) || [1])[0] || 1, intercept: (numbers(dv, f.intercept) || [0])[0] || 0,
      number: (numbers(dv, f.number) || [null])[0], ipp: numbers(dv, f.ipp), iop: numbers(dv, f.iop),
      pixels: null, why: "",
    };
    if (!readable) slice.why = `transfer syntax ${syntax} is not shown in the browser`;
    else if (f.encapsulated) slice.why = "compressed pixel data is not shown in the browser";
    else if (!f.pixels || !slice.rows || !slice.cols) slice.why = "no pixel data";
    else if (slice.samples !== 1) slice.why = "colour images are not shown";
    else slice.pixels = toFloat(buffer.slice(f.pixels.at, f.pixels.at + f.pixels.len), slice);
    return slice;
  }

  function toFloat(bytes, s) {
    const n = s.rows * s.cols;
    const Type = { 8: s.signed ? Int8Array : Uint8Array, 16: s.signed ? Int16Array : Uint16Array,
                   32: s.signed ? Int32Array : Uint32Array }[s.bits];
    if (!Type || bytes.byteLength < n * Type.BYTES_PER_ELEMENT) return null;
    const raw = new Type(bytes, 0, n);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = raw[i] * s.slope + s.intercept;
    return out;
  }

  // The service's order: position along the slice normal, else InstanceNumber, else as given.
  function order(slices) {
    const idx = slices.map((_, i) => i);
    const iop = slices[0].iop;
    if (iop && iop.length === 6 && slices.every((s) => s.ipp && s.ipp.length === 3)) {
      const [a, b, c, d, e, f] = iop;
      const n = [b * f - c * e, c * d - a * f, a * e - b * d];
      const pos = slices.map((s) => s.ipp[0] * n[0] + s.ipp[1] * n[1] + s.ipp[2] * n[2]);
      return idx.sort((i, j) => pos[i] - pos[j] || i - j).map((i) => slices[i]);
    }
    if (slices.every((s) => s.number !== null && !Number.isNaN(s.number))) {
      return idx.sort((i, j) => slices[i].number - slices[j].number || i - j).map((i) => slices[i]);
    }
    return slices;
  }

  // ------------------------------------------------------------------ mask and display

  function rleDecode(runs, shape) {
    const size = shape.reduce((a, b) => a * b, 1);
    const out = new Uint8Array(size);
    let at = 0;
    runs.forEach((len, i) => {
      if (i % 2 === 1) out.fill(1, at, at + len);
      at += len;
    });
    if (at !== size) throw new Error(`mask runs sum to ${at}, expected ${size}`);
    return out;
  }

  function windowOf(slices) {
    const sample = [];
    for (const s of slices) {
      const step = Math.max(1, Math.floor(s.pixels.length / 20000));
      for (let i = 0; i < s.pixels.length; i += step) sample.push(s.pixels[i]);
    }
    sample.sort((a, b) => a - b);
    const lo = sample[Math.floor(sample.length * 0.01)], hi = sample[Math.floor(sample.length * 0.99)];
    return hi > lo ? [lo, hi] : [lo, lo + 1];
  }

  function draw() {
    const [depth, rows, cols] = view.shape;
    const k = Number($("slice").value);
    $("slice-label").textContent = `${k + 1} / ${depth}`;
    const canvas = $("view");
    canvas.width = cols;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(cols, rows);
    const pixels = view.slices ? view.slices[k].pixels : null;
    const showMask = $("overlay").checked;
    const base = k * rows * cols;
    for (let i = 0; i < rows * cols; i++) {
      let g = 0;
      if (pixels) {
        g = Math.min(1, Math.max(0, (pixels[i] - view.lo) / (view.hi - view.lo))) * 255;
        if (view.invert) g = 255 - g;
      }
      let r = g, gr = g, b = g;
      if (showMask && view.mask[base + i]) {
        r = 0.55 * g + 0.45 * 255;
        gr = 0.55 * g;
        b = 0.55 * g;
      }
      img.data[4 * i] = r;
      img.data[4 * i + 1] = gr;
      img.data[4 * i + 2] = b;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function show(body, slices) {
    const shape = body.mask.shape;
    view.shape = shape;
    view.mask = rleDecode(body.mask.rle, shape);
    const usable = slices.length === shape[0] && slices.every(
      (s) => s.pixels && s.rows === shape[1] && s.cols === shape[2]);
    view.slices = usable ? slices : null;
    if (usable) {
      [view.lo, view.hi] = windowOf(slices);
      view.invert = slices[0].photometric === "MONOCHROME1";
    }
    const why = slices.find((s) => s.why);
    $("note").textContent = usable ? "" : `Mask only: ${why ? why.why : "the slices could not be read here"}.`;
    const score = $("score");
    score.textContent = `Triage score ${body.score.toFixed(3)}: ${body.status}`;
    score.className = body.status;
    $("model").textContent = `${body.model_name} version ${body.model_version}`;
    const slider = $("slice");
    slider.max = String(shape[0] - 1);
    // start on the slice with the largest mask
    const per = shape[1] * shape[2];
    let best = 0, most = -1;
    for (let k = 0; k < shape[0]; k++) {
      let n = 0;
      for (let i = k * per; i < (k + 1) * per; i++) n += view.mask[i];
      if (n > most) { most = n; best = k; }
    }
    slider.value = String(best);
    $("result").hidden = false;
    draw();
  }

  // ------------------------------------------------------------------ the request

  function say(text, error) {
    $("message").textContent = text;
    $("message").className = error ? "error" : "";
  }

  async function run(event) {
    event.preventDefault();
    const files = Array.from($("files").files);
    if (!files.length) {
      say("Choose the DICOM files of one series first.", true);
      return;
    }
    document.body.dataset.state = "busy";
    $("run").disabled = true;
    say(`Sending ${files.length} file(s)…`, false);
    const form = new FormData();
    files.forEach((f) => form.append("files", f, f.name));
    const headers = {};
    const apiKey = $("apikey").value.trim();
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    try {
      const reading = Promise.all(files.map(async (f) => {
        try { return parseDicom(await f.arrayBuffer()); } catch (e) { return { why: String(e), pixels: null }; }
      }));
      const response = await fetch("/v1/predict", { method: "POST", body: form, headers });
      const text = await response.text();
      let body = null;
      try { body = JSON.parse(text); } catch (e) { body = null; }
      if (!response.ok) {
        const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : text;
        throw new Error(`${response.status}: ${detail}`);
      }
      show(body, order(await reading));
      say(`Series ${body.series_instance_uid}`, false);
      document.body.dataset.state = "done";
    } catch (err) {
      say(err.message || String(err), true);
      document.body.dataset.state = "error";
    } finally {
      $("run").disabled = false;
    }
  }

  $("form").addEventListener("submit", run);
  $("slice").addEventListener("input", () => view.shape && draw());
  $("overlay").addEventListener("change", () => view.shape && draw());
})();
