// Easy Diffusion's page globals, looked up when used (ED declares several with top-level let/const:
// not properties of window, but module code resolves bare names through the same global scope).

// Each reference is a bare name on purpose; typeof guards "not declared", try guards the TDZ.
export const ed = {
    createTab() {
        try {
            return typeof createTab === "function" ? createTab : undefined
        } catch (e) {
            return undefined
        }
    },
    selectTab() {
        try {
            return typeof selectTab === "function" ? selectTab : undefined
        } catch (e) {
            return undefined
        }
    },
    showToast() {
        try {
            return typeof showToast === "function" ? showToast : undefined
        } catch (e) {
            return undefined
        }
    },
    getModels() {
        try {
            return typeof getModels === "function" ? getModels : undefined
        } catch (e) {
            return undefined
        }
    },
    modelsDB() {
        try {
            return typeof modelsDB === "object" && modelsDB ? modelsDB : undefined
        } catch (e) {
            return undefined
        }
    },
    sdModelField() {
        try {
            return typeof stableDiffusionModelField !== "undefined" ? stableDiffusionModelField : undefined
        } catch (e) {
            return undefined
        }
    },
    loraField() {
        try {
            return typeof loraModelField !== "undefined" ? loraModelField : undefined
        } catch (e) {
            return undefined
        }
    },
    promptField() {
        try {
            if (typeof promptField !== "undefined" && promptField) return promptField
        } catch (e) {
            /* fall through */
        }
        return document.getElementById("prompt")
    },
    bucket() {
        try {
            return typeof Bucket !== "undefined" ? Bucket : undefined
        } catch (e) {
            return undefined
        }
    },
}
