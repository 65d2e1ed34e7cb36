// The init image and the inpainting mask painted over it. The mask canvas has the image's own resolution and
// is shown scaled over the image; painted pixels (any alpha) are the area to repaint.

const MAX_SIDE = 2048; // larger uploads are scaled down on load: the server refuses such sizes anyway
const PAINT = "#ff2d6f";

export class MaskEditor {
  /** @param {HTMLCanvasElement} imageCanvas @param {HTMLCanvasElement} maskCanvas */
  constructor(imageCanvas, maskCanvas) {
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.brush = 32; // diameter in screen pixels
    this.loaded = false;
    this.painted = false;
    this.onchange = () => {};
    this.last = null;
    maskCanvas.addEventListener("pointerdown", (e) => this.start(e));
    maskCanvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      maskCanvas.addEventListener(type, () => this.end());
    }
  }

  /** Show an image file (a Blob) and clear the mask; resolves to the image's {width, height}. */
  async load(blob) {
    const bitmap = await createImageBitmap(blob);
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const width = Math.max(1, Math.round(bitmap.width * scale));
    const height = Math.max(1, Math.round(bitmap.height * scale));
    for (const canvas of [this.image, this.mask]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.image.getContext("2d").drawImage(bitmap, 0, 0, width, height);
    bitmap.close();
    this.loaded = true;
    this.fit();
    this.clear();
    return { width, height };
  }

  /** Show the image as large as the panel allows (small images scaled up, pixels kept sharp). */
  fit(maxWidth = 320, maxHeight = 320) {
    const panel = this.image.closest(".dropzone")?.clientWidth || 0;
    const room = panel > 60 ? Math.min(maxWidth, panel - 12) : maxWidth;
    const scale = Math.min(room / this.image.width, maxHeight / this.image.height);
    this.image.style.width = `${Math.round(this.image.width * scale)}px`;
    this.image.style.height = `${Math.round(this.image.height * scale)}px`;
    this.image.classList.toggle("pixelated", scale >= 2);
  }

  unload() {
    this.loaded = false;
    this.clear();
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
    this.onchange();
  }

  /** Swap painted and unpainted: the alpha of every pixel becomes 255 - alpha. */
  invert() {
    const ctx = this.mask.getContext("2d");
    const copy = new OffscreenCanvas(this.mask.width, this.mask.height);
    copy.getContext("2d").drawImage(this.mask, 0, 0);
    ctx.save();
    ctx.globalCompositeOperation = "copy";
    ctx.fillStyle = PAINT;
    ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(copy, 0, 0);
    ctx.restore();
    this.painted = this.hasPaint();
    this.onchange();
  }

  hasPaint() {
    if (!this.loaded || !this.mask.width) return false;
    const { data } = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  /** The init image resized to width x height, as a PNG data URL. */
  imagePNG(width, height) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(this.image, 0, 0, width, height);
    return canvas.toDataURL("image/png");
  }

  /** The mask resized to width x height as a PNG data URL: white = repaint, black = keep. */
  maskPNG(width, height) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(this.mask, 0, 0, width, height);
    ctx.globalCompositeOperation = "source-in"; // keep the painted alpha, make it white
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    ctx.globalCompositeOperation = "destination-over"; // black behind it
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    return canvas.toDataURL("image/png");
  }

  point(event) {
    const rect = this.mask.getBoundingClientRect();
    const scale = this.mask.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  start(event) {
    if (!this.loaded || event.button !== 0) return;
    event.preventDefault();
    this.mask.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  end() {
    if (!this.last) return;
    this.last = null;
    this.painted = true;
    this.onchange();
  }

  stroke(from, to) {
    const ctx = this.mask.getContext("2d");
    ctx.strokeStyle = PAINT;
    ctx.lineWidth = this.brush * to.scale;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.fillStyle = PAINT;
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, ctx.lineWidth / 2, 0, 2 * Math.PI); // a click: one dot
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
  }
}
