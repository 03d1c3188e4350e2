// tidemark-receiver: init, serve, token, status (CLI contract: DESIGN §9, README).
import { Command, Option } from 'commander';
import { TidemarkError } from '../shared/errors.js';
import { printJson, runCli } from '../shared/cli-util.js';
import { createLogger } from '../shared/log.js';
import { formatBytes } from '../shared/units.js';
import { Catalog } from './catalog.js';
import { initDataDir, openDataDir } from './data-dir.js';
import { ReceiverServer } from './server.js';

const program = new Command('tidemark-receiver').description('Tidemark receiver: stores encrypted recovery points of protected hosts');
const dataOption = () => new Option('--data <dir>', 'receiver data directory').makeOptionMandatory();

program.command('init')
  .description('create a data directory, its TLS identity and catalog; prints the fingerprint clients pin')
  .addOption(dataOption())
  .option('--json', 'print {"fingerprint": ...}')
  .action(async (opts: { data: string; json?: boolean }) => {
    const dir = await initDataDir(opts.data);
    if (opts.json) return printJson({ fingerprint: dir.fingerprint });
    process.stdout.write(`Initialized receiver data directory ${opts.data}\nTLS fingerprint (clients pass it as --fingerprint):\n${dir.fingerprint}\n`);
  });

program.command('serve')
  .description('accept agent and restore connections')
  .addOption(dataOption())
  .requiredOption('--listen <host:port>', 'address to listen on, e.g. 0.0.0.0:7443')
  .action(async (opts: { data: string; listen: string }) => {
    const match = /^(.*):(\d+)$/.exec(opts.listen);
    if (!match) throw new TidemarkError('E_USAGE', `invalid --listen "${opts.listen}": expected HOST:PORT`);
    const log = createLogger('tidemark-receiver');
    const dir = openDataDir(opts.data);
    const server = await ReceiverServer.start(dir, match[1]!.replace(/^\[|\]$/g, ''), Number(match[2]), log);
    const address = server.address();
    log.info({ host: address.address, port: address.port, fingerprint: dir.fingerprint }, 'listening');
    process.stdout.write(`listening on ${address.address}:${address.port} (fingerprint ${dir.fingerprint})\n`);
    await new Promise<void>((resolve) => {
      const stop = (signal: string) => {
        log.info({ signal }, 'shutting down');
        server.close().then(resolve, resolve);
      };
      process.once('SIGTERM', stop);
      process.once('SIGINT', stop);
    });
  });

program.command('token')
  .description('create a one-time enrollment token (or, with --restore, a read-only restore token)')
  .addOption(dataOption())
  .option('--restore', 'a reusable read-only token for tidemark-restore')
  .option('--json', 'print {"token": ...}')
  .action((opts: { data: string; restore?: boolean; json?: boolean }) => {
    const dir = openDataDir(opts.data);
    const catalog = Catalog.open(dir.catalogPath);
    try {
      const token = catalog.createToken(opts.restore ? 'restore' : 'enroll');
      if (opts.json) return printJson({ token, kind: opts.restore ? 'restore' : 'enroll' });
      process.stdout.write(`${token}\n`);
    } finally {
      catalog.close();
    }
  });

program.command('status')
  .description('hosts, disks, last point, lag and stored bytes')
  .addOption(dataOption())
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; json?: boolean }) => {
    const dir = openDataDir(opts.data);
    const catalog = Catalog.open(dir.catalogPath);
    try {
      const status = catalog.status();
      if (opts.json) return printJson({ fingerprint: dir.fingerprint, ...status });
      process.stdout.write(`fingerprint ${dir.fingerprint}\nstored: ${status.storedChunks} chunks, ${formatBytes(status.storedChunkBytes)} (packs ${formatBytes(status.packBytes)})\n`);
      for (const h of status.hosts) {
        const last = h.lastPoint ? `last point ${h.lastPoint.id} at ${h.lastPoint.time} (lag ${Math.round(h.lagSeconds!)}s)` : 'no point yet';
        process.stdout.write(`host ${h.name}: ${h.state}, ${h.points} points, ${last}\n`);
        for (const d of h.disks) process.stdout.write(`  disk ${d.name}: ${formatBytes(d.sizeBytes)}, ${d.blockBytes / 1024} KiB blocks\n`);
      }
    } finally {
      catalog.close();
    }
  });

await runCli(program);
