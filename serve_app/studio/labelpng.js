// Label maps as PNG files of class ids, in the browser, without libraries.
//
// encodeLabelPng writes a single-channel PNG (8-bit, or 16-bit when an id is above 255): the
// exact ids the canvas holds, which is what POST /v1/synthesize reads as raw label ids.
// decodeLabelImage reads a PNG of ids or of palette colours back into ids.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function zlib(bytes) {
  // CompressionStream's "deflate" is the zlib format PNG's IDAT wants.
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** ids: Uint16Array of width*height class ids -> Blob (image/png, grayscale). */
export async function encodeLabelPng(ids, width, height) {
  let max = 0;
  for (let i = 0; i < ids.length; i++) if (ids[i] > max) max = ids[i];
  const depth = max > 255 ? 16 : 8;
  const bpp = depth / 8;
  const raw = new Uint8Array(height * (1 + width * bpp));
  for (let y = 0; y < height; y++) {
    const row = y * (1 + width * bpp); // filter byte 0 (none), then the row
    for (let x = 0; x < width; x++) {
      const v = ids[y * width + x];
      if (bpp === 1) raw[row + 1 + x] = v;
      else { raw[row + 1 + 2 * x] = v >> 8; raw[row + 2 + 2 * x] = v & 0xff; }
    }
  }
  const header = new Uint8Array(13);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, width);
  hv.setUint32(4, height);
  header.set([depth, 0, 0, 0, 0], 8); // grayscale, deflate, adaptive filtering, no interlace
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  const parts = [signature, chunk("IHDR", header), chunk("IDAT", await zlib(raw)), chunk("IEND", new Uint8Array())];
  return new Blob(parts, { type: "image/png" });
}

/**
 * An uploaded label map -> {ids, width, height}. Gray pixels whose values are class ids are
 * taken as ids; otherwise every pixel must be a palette colour. Throws Error with a message
 * a person can act on.
 */
export async function decodeLabelImage(file, palette) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (err) {
    throw new Error(`${file.name || "the file"} is not an image this browser can read`);
  }
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const ids = new Uint16Array(width * height);
  let gray = true;
  for (let i = 0; i < ids.length; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (r !== g || g !== b || r >= palette.length) { gray = false; break; }
    ids[i] = r;
  }
  if (gray) return { ids, width, height, kind: "ids" };
  const byColour = new Map(palette.map((c, id) => [(c[0] << 16) | (c[1] << 8) | c[2], id]));
  for (let i = 0; i < ids.length; i++) {
    const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
    const id = byColour.get(key);
    if (id === undefined) {
      const x = i % width, y = Math.floor(i / width);
      throw new Error(`pixel (${x}, ${y}) has colour rgb(${rgba[4 * i]}, ${rgba[4 * i + 1]}, ${rgba[4 * i + 2]}), ` +
        "which is no class of this model: load a map of class ids or of this model's palette colours");
    }
    ids[i] = id;
  }
  return { ids, width, height, kind: "colours" };
}
