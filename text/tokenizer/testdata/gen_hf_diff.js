// Generates hf_diff.json: random texts / id sequences run through the real
// Hugging Face tokenizers (Rust, npm package "tokenizers"@0.23.2) for
// differential testing of the Go implementation.
//   cd $(mktemp -d) && npm install tokenizers@0.23.2 && \
//   NODE_PATH=$PWD/node_modules node /work/main/runtime/tokenizer/testdata/gen_hf_diff.js
const { Tokenizer } = require('tokenizers');
const fs = require('fs');
const path = require('path');
const root = path.join(__dirname, '../../..');

// Env: HF_DIFF_N (default 1500 texts), HF_DIFF_SEED, HF_DIFF_OUT (default testdata/hf_diff.json).
const N = parseInt(process.env.HF_DIFF_N || '1500');
let seed = parseInt(process.env.HF_DIFF_SEED || '12345');
function rnd(n) { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n; }
const atoms = [
  'a', 'b', 'Z', 'hello', 'World', 'the', 'DON', 'x', 'ab1', '0', '7', '42', '12345', '3.14',
  "'s", "'S", "'t", "'re", "'RE", "'ve", "'m", "'ll", "'LL", "'d", "'", "'x", "'ſ", "'K",
  ' ', ' ', ' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', '\r', '\v', '\f', '\u00a0', '\u3000', '\u2028', '\u0085', '\u1680', ' \n ',
  'é', 'ß', 'Ω', 'ǅ', 'ʰ', '中文', 'アイ', '한국', 'ñ', 'e\u0301', '\u0301', 'ﬁ',
  '٣', '½', 'Ⅻ', '²', '①',
  '!', '?', '.', ',', ';', ':', '-', '_', '"', '(', ')', '{', '}', '[', ']', '<', '>', '|', '/', '\\', '@', '#', '$', '%', '^', '&', '*', '+', '=', '~', '`', '...', '—', '“', '”', '…', '→',
  '🙂', '👍🏽', '🇫🇷', '👨‍👩‍👧', '🦙', '𝔘',
  '<|eot_id|>', '<|begin_of_text|>', '<mask>', ' <mask> ', '[X]', '[X]  ', 'hello', ' hello', 'ab', ' ab ', 'xab', '<|start_header_id|>', '<|eot', '<|', '<s>', '</s>', '<unk>', '▁', '▁▁',
];
function randText() {
  const n = rnd(process.env.HF_DIFF_N ? 40 : 12);
  let s = '';
  for (let i = 0; i < n; i++) s += atoms[rnd(atoms.length)];
  return s;
}
(async () => {
  const out = {};
  const models = { llama3: 'testdata/llama3-tokenizer/model/tokenizer.json', stories260K: 'models/stories260K/tokenizer.json' };
  const sizes = { llama3: 128256, stories260K: 512, stories_added: 520, llama3_gpt2: 128256 };
  // Variants: a base model with top-level members replaced ("set").
  const variants = {
    stories_added: { base: 'stories260K', set: { added_tokens: [
      { id: 0, content: '<unk>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 1, content: '<s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 2, content: '</s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 512, content: '<mask>', single_word: false, lstrip: true, rstrip: false, normalized: false, special: true },
      { id: 513, content: '[X]', single_word: false, lstrip: false, rstrip: true, normalized: false, special: true },
      { id: 514, content: 'hello', single_word: false, lstrip: false, rstrip: false, normalized: true, special: false },
      { id: 515, content: 'ab', single_word: true, lstrip: false, rstrip: false, normalized: false, special: false },
      { id: 516, content: '<|eot', single_word: false, lstrip: true, rstrip: true, normalized: false, special: false },
    ] } },
    llama3_gpt2: { base: 'llama3', set: { pre_tokenizer: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true } } },
  };
  const all = Object.assign({}, models, variants);
  for (const [name, spec] of Object.entries(all)) {
    let tok;
    if (typeof spec === 'string') {
      tok = Tokenizer.fromFile(path.join(root, spec));
    } else {
      const j = JSON.parse(fs.readFileSync(path.join(root, models[spec.base]), 'utf8'));
      Object.assign(j, spec.set);
      const tmp = path.join(require('os').tmpdir(), 'hf_diff_' + name + '.json');
      fs.writeFileSync(tmp, JSON.stringify(j));
      tok = Tokenizer.fromFile(tmp);
    }
    const enc = [], dec = [];
    for (let i = 0; i < N; i++) {
      const text = randText();
      const e = await tok.encode(text, null, { addSpecialTokens: false });
      enc.push({ text, ids: e.getIds() });
    }
    for (let i = 0; i < N / 3; i++) {
      const n = 1 + rnd(6);
      const ids = [];
      for (let j = 0; j < n; j++) {
        const r = rnd(10);
        ids.push(r < 6 ? rnd(260) : r < 9 ? rnd(sizes[name]) : sizes[name] - 1 - rnd(300));
      }
      dec.push({ ids, text: await tok.decode(ids, false), skip: await tok.decode(ids, true) });
    }
    out[name] = { variant: typeof spec === 'string' ? null : spec, encode: enc, decode: dec };
  }
  fs.writeFileSync(process.env.HF_DIFF_OUT || path.join(__dirname, 'hf_diff.json'), JSON.stringify(out));
})();
