#!/usr/bin/env node
// Thin launcher: the TypeScript sources are compiled to dist/ by `npm ci` (the "prepare" script).
import '../dist/restore/cli.js';
