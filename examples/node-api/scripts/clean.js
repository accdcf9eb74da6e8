#!/usr/bin/env node
'use strict';
// Cross-platform `rm -rf <dir>...` used by the build and test scripts (no extra dependency).
const fs = require('node:fs');
const path = require('node:path');

for (const dir of process.argv.slice(2)) {
  fs.rmSync(path.resolve(__dirname, '..', dir), { recursive: true, force: true });
}
