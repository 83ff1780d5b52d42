// Per picture: the face crop's frame over the picture (POST /pictures/faces), when the face crop is on.
import { el } from "../dom.js"
import { faceCropOn } from "../face-crop.js"

const pct = (v, of) => (100 * v) / of + "%"

/** Nodes drawn over the picture; none until the face crop is on and the daemon answered for this picture. */
export function cropParts(img) {
    if (!faceCropOn() || img.face === undefined || !img.faceSize || !img.faceSize.width) return []
    if (!img.crop) return [el("div", { className: "clora-crop-none", attrs: { "data-clora": "crop-none" }, text: "no face: whole picture" })]
    const { width, height } = img.faceSize
    const c = img.crop
    // the frame lies over the picture as the thumbnail shows it: object-fit cover, centred (see .clora-thumb img)
    const scale = Math.max(1 / width, 1 / height)
    const shownW = width * scale
    const shownH = height * scale
    const left = (1 - shownW) / 2 + c.x * scale
    const top = (1 - shownH) / 2 + c.y * scale
    return [
        el("div", {
            className: "clora-crop-frame",
            attrs: { "data-clora": "crop-frame", title: "Cropped to " + c.w + "×" + c.h + " around the face" },
            style: { left: pct(left, 1), top: pct(top, 1), width: pct(c.w * scale, 1), height: pct(c.h * scale, 1) },
        }),
    ]
}
