// The form's pictures, one card each: the picture (with its face crop, when on), its warnings, its caption.
// Each part comes from the module that owns it; a card is rebuilt whenever the pictures or their data change.
import { el, icon } from "../dom.js"
import { state } from "../store.js"
import { ui } from "./ui.js"
import { removeImage } from "../images.js"
import { warningParts } from "./picture-checks.js"
import { cropParts } from "./face-crop.js"
import { captionParts } from "./captions.js"

export function renderImages() {
    if (!ui.thumbs) return
    ui.thumbs.replaceChildren(
        ...state.images.map((img) =>
            el(
                "div",
                { className: "clora-thumb" + (img.problem ? " clora-bad" : ""), attrs: { title: img.file.name + (img.problem ? " — " + img.problem : ""), "data-clora": "thumb" } },
                el("div", { className: "clora-thumb-pic" }, el("img", { attrs: { src: img.url, alt: img.file.name, loading: "lazy" } }), ...cropParts(img)),
                ...warningParts(img),
                ...captionParts(img),
                el(
                    "button",
                    { className: "secondaryButton", attrs: { type: "button", title: "Remove " + img.file.name, "aria-label": "Remove " + img.file.name, "data-clora": "remove-image" }, on: { click: (e) => { e.stopPropagation(); removeImage(img.id) } } },
                    icon("fa-xmark")
                )
            )
        )
    )
}
