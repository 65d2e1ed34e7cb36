// Generation parameters stored in PNG files: the `parameters` text chunk that leansd and AUTOMATIC1111 write
// (tEXt, zTXt or iTXt), and the infotext format inside it:
//   prompt (one or more lines)
//   Negative prompt: ... (optional, may continue on further lines)
//   Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

/** The text chunks of a PNG as {keyword: text}; null when the bytes are not a PNG. */
export async function pngTextChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const chunks = {};
  let at = 8;
  while (at + 12 <= bytes.length) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, Math.min(at + 8 + length, bytes.length));
    at += 12 + length;
    try {
      const chunk = await readTextChunk(type, data);
      if (chunk && !(chunk.keyword in chunks)) chunks[chunk.keyword] = chunk.text;
    } catch {
      // a damaged or unsupported text chunk: skip it
    }
    if (type === "IEND") break;
  }
  return chunks;
}

async function readTextChunk(type, data) {
  if (type !== "tEXt" && type !== "zTXt" && type !== "iTXt") return null;
  const nul = data.indexOf(0);
  if (nul < 0) return null;
  const keyword = latin1(data.subarray(0, nul));
  if (type === "tEXt") return { keyword, text: latin1(data.subarray(nul + 1)) };
  if (type === "zTXt") return { keyword, text: latin1(await inflate(data.subarray(nul + 2))) };
  // iTXt: keyword \0 compressed-flag method language \0 translated-keyword \0 text (UTF-8)
  const compressed = data[nul + 1] === 1;
  const languageEnd = data.indexOf(0, nul + 3);
  const translatedEnd = data.indexOf(0, languageEnd + 1);
  if (languageEnd < 0 || translatedEnd < 0) return null;
  let text = data.subarray(translatedEnd + 1);
  if (compressed) text = await inflate(text);
  return { keyword, text: new TextDecoder("utf-8").decode(text) };
}

function latin1(bytes) {
  return new TextDecoder("latin1").decode(bytes);
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// `Key: value` or `Key: "json string"`, comma-separated, as A1111 writes them.
const FIELD = /\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;

function fieldsOf(line) {
  const fields = {};
  let count = 0;
  for (const match of line.matchAll(FIELD)) {
    let value = match[2].trim();
    if (value.startsWith('"') && value.endsWith('"') && value.length >= 2) {
      try {
        value = JSON.parse(value);
      } catch {
        // keep it as written
      }
    }
    fields[match[1].trim()] = value;
    count += 1;
  }
  return { fields, count };
}

/**
 * Parse infotext into {prompt, negativePrompt, fields}; the last line holds the fields when it has at least
 * three `Key: value` pairs (a prompt may contain a colon or two).
 */
export function parseInfotext(text) {
  const lines = text.replace(/\r\n?/g, "\n").trim().split("\n");
  let fields = {};
  if (lines.length) {
    const last = fieldsOf(lines[lines.length - 1]);
    if (last.count >= 3) {
      fields = last.fields;
      lines.pop();
    }
  }
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (const line of lines) {
    if (!inNegative && line.startsWith("Negative prompt:")) {
      inNegative = true;
      negative.push(line.slice("Negative prompt:".length).trim());
    } else if (inNegative) {
      negative.push(line);
    } else {
      prompt.push(line);
    }
  }
  return { prompt: prompt.join("\n").trim(), negativePrompt: negative.join("\n").trim(), fields };
}

/**
 * The form settings an infotext describes: prompt, negative_prompt, steps, guidance_scale, seed, width, height,
 * sampler (the A1111 display name, with "Schedule type" folded in as A1111 >= 1.9 splits it), model, strength,
 * batch_size. Fields the text lacks are left out.
 */
export function settingsFromInfotext(text) {
  const { prompt, negativePrompt, fields } = parseInfotext(text);
  const settings = { prompt, negative_prompt: negativePrompt };
  const number = (key, name, parse = Number) => {
    if (key in fields && fields[key] !== "" && Number.isFinite(parse(fields[key]))) settings[name] = parse(fields[key]);
  };
  number("Steps", "steps", (v) => parseInt(v, 10));
  number("CFG scale", "guidance_scale", parseFloat);
  number("Denoising strength", "strength", parseFloat);
  number("Batch size", "batch_size", (v) => parseInt(v, 10));
  // Seeds go up to 2**64 - 1, beyond exact JavaScript numbers: kept as the digits.
  if (/^\d+$/.test(fields.Seed || "")) settings.seed = fields.Seed;
  const size = /^(\d+)\s*x\s*(\d+)$/.exec(fields.Size || "");
  if (size) {
    settings.width = Number(size[1]);
    settings.height = Number(size[2]);
  }
  if (fields.Sampler) {
    const schedule = fields["Schedule type"];
    const sampler = fields.Sampler;
    settings.sampler = schedule && schedule !== "Automatic" && !sampler.endsWith(schedule) ? `${sampler} ${schedule}` : sampler;
  }
  if (fields.Model) settings.model = fields.Model;
  return settings;
}
