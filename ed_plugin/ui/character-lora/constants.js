// Character LoRA tab: fixed values shared by the modules (limits mirror the daemon's checks).
export const VERSION = "0.1.0"
export const TAB_ID = "character-lora"
export const INFO_URL = "/character-lora/info"
export const START_URL = "/character-lora/start"
export const MIN_IMAGES = 8
export const MAX_IMAGES = 25
export const MIN_SIDE = 64
export const MAX_ASPECT = 6 // the daemon refuses pictures more elongated than 1:6 (daemon/pipeline/dataset.py)
export const BUCKET_STEP = 64 // kohya's bucket_reso_steps, as the daemon's dataset TOML sets it
// Control and invisible characters the daemon refuses in the trigger and class word (daemon/jobs/fields.py)
export const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]/
export const DEFAULT_LORA_WEIGHT = 0.8
export const MAX_LOG_LINES = 300
// while a job trains, how often its stored params and recovery record (saved state size) are fetched again
export const DETAILS_EVERY_MS = 5000
export const HANDLED_KEY = "characterLora.handledJobs"
export const NAME_RE = /^[A-Za-z0-9 _-]{1,64}$/
export const TRIGGER_RE = /^[^\s,]{1,32}$/
export const FINISHED = ["done", "error", "cancelled", "interrupted"]
export const ACTIVE = ["queued", "prepping", "training", "copying"]
export const STATE_LABELS = {
    queued: "Queued",
    prepping: "Preparing images",
    training: "Training",
    copying: "Saving LoRA",
    done: "Done",
    error: "Failed",
    cancelled: "Cancelled",
    interrupted: "Interrupted",
}
export const ARCH_LABELS = { sd1: "SD 1.x", sd2: "SD 2.x", sdxl: "SDXL", unknown: "unknown architecture" }
// The daemon's memory tiers (daemon/pipeline/fit.py); /fit's `tiers` has the labels, these are for old job records
export const TIER_LABELS = { cpu: "CPU", "6gb": "6 GB", "8gb": "8 GB", "12gb": "12 GB", "16gb": "16 GB", "24gb": "24 GB", "40gb": "40+ GB" }
export const FIT_DEBOUNCE_MS = 250
// Advanced fields: the daemon's `params` keys. Only the ones the user changes are sent.
export const PARAM_FIELDS = [
    { key: "resolution", label: "Resolution (px)", type: "int", step: 64, min: 256, max: 1024 },
    { key: "epochs", label: "Epochs", type: "int", step: 1, min: 1, max: 100 },
    { key: "repeats", label: "Repeats per image", type: "int", step: 1, min: 1, max: 100, auto: true },
    { key: "batch_size", label: "Batch size", type: "int", step: 1, min: 1, max: 32 }, // 32: the 80 GB tier's SD 1.x batch
    { key: "network_dim", label: "Network dim (rank)", type: "int", step: 1, min: 1, max: 256 },
    { key: "network_alpha", label: "Network alpha", type: "float", step: "any", min: 0 },
    { key: "unet_lr", label: "U-Net learning rate", type: "float", step: "any", min: 0 },
    { key: "text_encoder_lr", label: "Text encoder learning rate", type: "float", step: "any", min: 0 },
    { key: "seed", label: "Seed", type: "int", step: 1, min: 0, max: 4294967295 },
    // at most `epochs` (checked in paramsProblem); 0 = no preview pictures
    { key: "sample_every_n_epochs", label: "Preview every N epochs", type: "int", step: 1, min: 0, max: 100, title: "A preview picture of the character every N epochs; 0 = off" },
]
// kohya's preview names: <name>_e<epoch:06d>_<idx>_<timestamp>[_<seed>].png
export const SAMPLE_NAME_RE = /_e(\d+)_(\d+)_\d+(?:_\d+)?\.png$/i
