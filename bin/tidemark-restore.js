#!/usr/bin/env -S node --initial-old-space-size=128
// Thin launcher: the TypeScript sources are compiled to dist/ by `npm ci` (the "prepare" script).
//
// --initial-old-space-size: a restore opens a 64 KiB plaintext per block, and
// with V8's small starting old generation it spent ~0.8 s per GiB in full
// garbage collections; with 128 MB a 1 GiB restore took ~7-15 % less wall
// time (bench image, A/B runs). See bin/tidemark-receiver.js.
import '../dist/restore/cli.js';
