// Z-Image Turbo VRAM/Latency Probe: after each run, draw the figures on the node itself:
// a memory bar for the pipeline's device and the time of each phase.
//
// The backend sends them in the node's ui output: {"text": [report], "zimage_probe": [figures]}.
// A DOM widget (not canvas drawing) shows them, so the numbers are selectable text, scale with
// the canvas like ComfyUI's own text boxes, and tests can read them from stable data attributes:
//   .zimage-probe[data-state="ready"][data-total-ms][data-denoise-ms]...[data-memory-source]
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { addStyle, el, formatBytes, formatMs, passCanvasGestures } from "./zimage_dom.js";

const NODE_CLASS = "ZImageTurboProbe";
const VIEW_HEIGHT = 236; // px, enough for the bar, six phases and two lines of notes
const MARGIN = 6; // px around the view, as ComfyUI's own DOM widgets

addStyle("zimage-probe-style", `
.zimage-probe { box-sizing: border-box; padding: 4px 6px; font: 12px sans-serif; line-height: 17px;
  min-height: ${VIEW_HEIGHT - 2 * MARGIN}px; /* node renderings that do not ask the widget for its height */
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #1c1c1c);
  border: 1px solid var(--border-color, #444); border-radius: 6px; overflow: hidden; user-select: text; }
.zimage-probe-empty { color: var(--descrip-text, #999); padding-top: 8px; }
.zimage-probe-device { font-weight: bold; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.zimage-probe-memory-label { display: flex; justify-content: space-between; gap: 8px; white-space: nowrap; }
.zimage-probe-memory-name { flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.zimage-probe-memory-used { flex: none; font-variant-numeric: tabular-nums; }
.zimage-probe-bar { position: relative; height: 10px; margin: 2px 0 6px; border-radius: 5px;
  background: rgba(127, 127, 127, 0.25); overflow: hidden; }
.zimage-probe-bar-fill { position: absolute; inset: 0 auto 0 0; border-radius: 5px; background: #43a047; }
.zimage-probe-bar-fill.zimage-probe-high { background: #fb8c00; }
.zimage-probe-bar-fill.zimage-probe-full { background: #e53935; }
.zimage-probe-bar-fill.zimage-probe-unknown { background: repeating-linear-gradient(45deg, #607d8b 0 6px, #455a64 6px 12px); }
.zimage-probe-phases { display: grid; grid-template-columns: 78px 1fr 74px; gap: 1px 6px; align-items: center; }
.zimage-probe-phase-name { white-space: nowrap; }
.zimage-probe-phase-bar { height: 8px; border-radius: 4px; background: #42a5f5; min-width: 1px; }
.zimage-probe-phase-time { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.zimage-probe-total { font-weight: bold; }
.zimage-probe-note { color: var(--descrip-text, #999); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`);

const PHASE_COLORS = { load: "#78909c", lora: "#ab47bc", text_encode: "#42a5f5", denoise: "#66bb6a", vae_decode: "#ffa726" };

const sum = (values) => values.reduce((a, b) => a + (Number(b) || 0), 0);

/** Which memory figure to show: NVML for the pipeline's GPU, else torch's allocator, else this process. */
function memoryFigures(probe, ramTotalBytes) {
    const during = Boolean(probe.nvml_during?.available);
    const nvml = during ? probe.nvml_during : probe.nvml_after;
    if (nvml?.available) {
        return {
            source: "nvml", label: `VRAM ${nvml.name}`, used: nvml.used_bytes, total: nvml.total_bytes,
            note: `GPU ${nvml.utilization_pct}% busy ${during ? "while denoising" : "after the run"}, ${nvml.temperature_c} °C`,
        };
    }
    const torch = probe.torch_memory ?? {};
    if (Number.isFinite(torch.reserved_bytes)) {
        return {
            source: "torch", label: "VRAM (torch reserved)", used: torch.reserved_bytes, total: null,
            note: `peak reserved ${formatBytes(torch.peak_reserved_bytes)}; ${nvml?.reason ?? "NVML unavailable"}`,
        };
    }
    return {
        source: "process_rss", label: "RAM (no NVIDIA GPU)", used: probe.process_rss_bytes,
        total: ramTotalBytes ?? null,
        note: `${nvml?.reason ?? "no NVIDIA GPU"} · bar: process RSS / RAM`,
    };
}

// RAM size for the CPU bar (RSS of total), from ComfyUI's /system_stats, asked once.
let ramTotal = null;
async function systemRamTotal() {
    if (ramTotal === null) {
        ramTotal = api.fetchApi("/system_stats")
            .then((res) => (res.ok ? res.json() : null))
            .then((stats) => stats?.system?.ram_total ?? undefined)
            .catch(() => undefined);
    }
    return ramTotal;
}

class ProbeView {
    constructor(node) {
        this.node = node;
        this.probe = null; // the latest zimage_probe figures
        this.element = el("div.zimage-probe", { dataset: { state: "empty" } });
        this.renderEmpty("No run yet: queue the workflow to see memory and timings here.");
    }

    renderEmpty(message) {
        this.element.dataset.state = "empty";
        this.element.replaceChildren(el("div.zimage-probe-empty", {}, message));
    }

    async update(probe, reportText) {
        this.probe = probe;
        this.reportText = reportText ?? "";
        if (!probe || !Array.isArray(probe.step_s)) {
            // The pipeline has not generated yet: the backend says so in its text.
            this.renderEmpty(reportText || "The probe sent no figures.");
            return;
        }
        // Without a GPU the bar shows ComfyUI's RSS against the machine's RAM: fetch that size once.
        const needsRam = memoryFigures(probe).source === "process_rss";
        this.render(probe, needsRam ? await systemRamTotal() : undefined);
    }

    render(probe, ramTotalBytes) {
        const loadS = sum(Object.values(probe.load_s ?? {}));
        const phases = [
            ["load", "load", loadS, Object.keys(probe.load_s ?? {}).join(", ") || "cached"],
            ["lora", "LoRA", probe.lora_s, (probe.lora ?? []).map((l) => `${l.file}@${l.strength}`).join(", ") || "none"],
            ["text_encode", "text encode", probe.text_encode_s, probe.embedding_cache_hit ? "cache hit" : `${probe.prompt_tokens} tokens`],
            ["denoise", "denoise", probe.denoise_s, `${probe.step_s.length} steps`],
            ["vae_decode", "VAE decode", probe.vae_decode_s, ""],
        ];
        const longest = Math.max(1e-9, ...phases.map(([, , s]) => Number(s) || 0));
        const meanStep = probe.mean_step_s ?? (probe.step_s.length ? sum(probe.step_s) / probe.step_s.length : 0);
        const memory = memoryFigures(probe, ramTotalBytes);
        const fraction = memory.total ? Math.min(1, memory.used / memory.total) : null;

        const ms = (s) => String(Math.round((Number(s) || 0) * 100000) / 100); // 0.01 ms resolution
        Object.assign(this.element.dataset, {
            state: "ready",
            device: probe.device_name ?? probe.device ?? "",
            totalMs: ms(probe.total_s), loadMs: ms(loadS), loraMs: ms(probe.lora_s),
            textEncodeMs: ms(probe.text_encode_s), denoiseMs: ms(probe.denoise_s), stepMs: ms(meanStep),
            vaeDecodeMs: ms(probe.vae_decode_s), steps: String(probe.step_s.length),
            memorySource: memory.source, memoryUsedBytes: String(memory.used ?? ""),
            memoryTotalBytes: String(memory.total ?? ""),
            size: `${probe.width}x${probe.height}`,
        });

        const fillClass = fraction === null ? ".zimage-probe-unknown" : fraction > 0.95 ? ".zimage-probe-full" : fraction > 0.8 ? ".zimage-probe-high" : "";
        const usedText = memory.total
            ? `${formatBytes(memory.used)} / ${formatBytes(memory.total)} (${Math.round(fraction * 100)}%)`
            : formatBytes(memory.used);

        this.element.replaceChildren(
            el("div.zimage-probe-device", { title: probe.source ?? "" },
                `${probe.device_name ?? probe.device} · ${probe.dtype} · ${probe.width}×${probe.height}`
                + (probe.base_reloaded ? " · model loaded" : "")),
            el("div.zimage-probe-memory-label", {},
                el("span.zimage-probe-memory-name", {}, memory.label),
                el("span.zimage-probe-memory-used", {}, usedText)),
            el("div.zimage-probe-bar", { title: memory.note },
                el(`div.zimage-probe-bar-fill${fillClass}`, { style: { width: `${fraction === null ? 100 : Math.max(1, fraction * 100)}%` } })),
            el("div.zimage-probe-phases", {},
                phases.flatMap(([key, label, seconds, detail]) => [
                    el("span.zimage-probe-phase-name", { title: detail }, label),
                    el("div", {}, el("div.zimage-probe-phase-bar", {
                        style: { width: `${(100 * (Number(seconds) || 0)) / longest}%`, background: PHASE_COLORS[key] },
                    })),
                    el("span.zimage-probe-phase-time", { dataset: { phase: key }, title: detail }, formatMs(seconds)),
                ]),
                el("span.zimage-probe-phase-name.zimage-probe-note", {}, "per step"),
                el("span.zimage-probe-note", {}, `mean of ${probe.step_s.length}`),
                el("span.zimage-probe-phase-time.zimage-probe-note", { dataset: { phase: "step" } }, formatMs(meanStep)),
                el("span.zimage-probe-phase-name.zimage-probe-total", {}, "total"),
                el("span", {}),
                el("span.zimage-probe-phase-time.zimage-probe-total", {
                    dataset: { phase: "total" },
                    title: "The generation, from the sampler's start to the decoded image; a load done by the loader node is counted in 'load' only",
                }, formatMs(probe.total_s)),
            ),
            el("div.zimage-probe-note", { title: memory.note }, memory.note),
        );
        this.node.setDirtyCanvas(true, true);
    }
}

app.registerExtension({
    name: "ZImageTurbo.ProbeFigures",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE_CLASS) return;

        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function (...args) {
            const result = onNodeCreated?.apply(this, args);
            const view = new ProbeView(this);
            const widget = this.addDOMWidget("probe_figures", "zimage_probe", view.element, {
                serialize: false, // figures of the last run only; never saved or sent
                hideOnZoom: true,
                margin: MARGIN,
                getValue: () => "",
                setValue: () => {},
                getMinHeight: () => VIEW_HEIGHT,
                getMaxHeight: () => VIEW_HEIGHT,
            });
            widget.serialize = false;
            this.zimageProbeView = view; // handle for tests and other extensions
            passCanvasGestures(view.element, app.canvas);
            if (this.size[0] < 340) this.setSize([340, this.size[1]]);
            return result;
        };

        // Called by ComfyUI with the node's ui output each time it runs.
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message, ...rest) {
            const result = onExecuted?.call(this, message, ...rest);
            this.zimageProbeView?.update(message?.zimage_probe?.[0], message?.text?.[0]).catch((err) => {
                console.error("[Z-Image Turbo] probe view:", err);
                this.zimageProbeView?.renderEmpty(`Could not show the probe figures: ${err.message ?? err}`);
            });
            return result;
        };
    },
});
