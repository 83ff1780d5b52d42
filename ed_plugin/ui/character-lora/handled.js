// Jobs whose end the user was already told about, kept across page loads.
import { HANDLED_KEY } from "./constants.js"

export function loadHandled() {
    try {
        const raw = JSON.parse(localStorage.getItem(HANDLED_KEY) || "[]")
        return new Set(Array.isArray(raw) ? raw : [])
    } catch (e) {
        return new Set()
    }
}

export function saveHandled(set) {
    try {
        localStorage.setItem(HANDLED_KEY, JSON.stringify(Array.from(set).slice(-200)))
    } catch (e) {
        /* private mode: fine, we just may repeat a toast */
    }
}
