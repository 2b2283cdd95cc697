// Run a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU build) on token ids given by the caller.
// Usage: node client.mjs request.json   (written by benchmarks/llama_cpp_client.py; prints one JSON line)
// request: {model, threads, context, prompt_ids, n_gen, windows: [[id, ...], ...], text}
// reply:   {greedy_ids, window_nll: [summed NLL per window], tokens, text_ids: llama.cpp's own tokens of text}
import {readFileSync} from "node:fs";
import {getLlama} from "node-llama-cpp";

const req = JSON.parse(readFileSync(process.argv[2], "utf8"));
const t0 = Date.now();
const llama = await getLlama({gpu: false, build: "never", progressLogs: false, logLevel: "error"});
const model = await llama.loadModel({modelPath: req.model});
const context = await model.createContext({contextSize: req.context, batchSize: req.context, threads: req.threads});
const seq = context.getSequence();
const loadSeconds = (Date.now() - t0) / 1000;

// log p(target | prefix) from raw logits: logit[target] - max logit - log(sum exp(logit - max logit))
function logProb(next, target) {
  const max = next.logits.entries().next().value[1];
  for (const [tok, logit] of next.logits) if (tok === target) return logit - max - Math.log(next.totalLogitWeight);
  throw new Error(`no logit for token ${target}`);
}

// (includeMax returns an empty map in 3.22.1, includeTop: 1 does not)
// greedy continuation: the argmax of the raw logits at every step (no sampler state involved)
async function greedy(promptIds, n) {
  await seq.clearHistory();
  const out = [];
  let input = promptIds;
  for (let i = 0; i < n; i++) {
    const items = input.map((t, j) => j === input.length - 1
      ? [t, {generateNext: {logits: {filter: {tokens: [], includeTop: 1}}}}] : t);
    const res = await seq.controlledEvaluate(items);
    const next = res[input.length - 1].next.logits.entries().next().value[0];
    out.push(next);
    input = [next];
  }
  return out;
}

async function windowNll(ids) {
  await seq.clearHistory();
  const items = ids.map((t, j) => j < ids.length - 1
    ? [t, {generateNext: {logits: {filter: {tokens: [ids[j + 1]], includeTop: 1}}, totalLogitWeight: true}}] : t);
  const res = await seq.controlledEvaluate(items);
  let nll = 0;
  for (let j = 0; j < ids.length - 1; j++) nll -= logProb(res[j].next, ids[j + 1]);
  return nll;
}

const t1 = Date.now();
const greedyIds = await greedy(req.prompt_ids, req.n_gen);
const t2 = Date.now();
const nll = [];
for (const w of req.windows) nll.push(await windowNll(w));
const t3 = Date.now();
const textIds = req.text == null ? null : Array.from(model.tokenize(req.text));
console.log(JSON.stringify({
  greedy_ids: greedyIds, window_nll: nll, tokens: req.windows.reduce((s, w) => s + w.length - 1, 0),
  text_ids: textIds, load_seconds: loadSeconds, greedy_seconds: (t2 - t1) / 1000, ppl_seconds: (t3 - t2) / 1000,
  llama_cpp: {build: llama.buildType, cpu_math_cores: llama.cpuMathCores, threads: context.currentThreads},
}));
await context.dispose();
await model.dispose();
await llama.dispose();
