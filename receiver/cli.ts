// tidemark-receiver: init, serve, token, status (CLI contract: DESIGN §9, README).
import { Command, Option } from 'commander';
import { TidemarkError } from '../shared/errors.js';
import { printJson, runCli } from '../shared/cli-util.js';
import { createLogger } from '../shared/log.js';
import { formatBytes, parseDurationMs } from '../shared/units.js';
import { parseIntOption } from '../shared/cli-util.js';
import { prune } from './prune.js';
import { resolvePolicy } from './retention.js';
import { Catalog } from './catalog.js';
import { initDataDir, openDataDir } from './data-dir.js';
import { ReceiverServer } from './server.js';
import { runReceiverVerify } from './verify.js';

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
  .description('accept agent and restore connections; prunes on a schedule')
  .addOption(dataOption())
  .requiredOption('--listen <host:port>', 'address to listen on, e.g. 0.0.0.0:7443')
  .option('--prune-interval <duration>', 'how often retention runs (0s: never; default: config.json pruneInterval, else 1h)')
  .action(async (opts: { data: string; listen: string; pruneInterval?: string }) => {
    const match = /^(.*):(\d+)$/.exec(opts.listen);
    if (!match) throw new TidemarkError('E_USAGE', `invalid --listen "${opts.listen}": expected HOST:PORT`);
    const log = createLogger('tidemark-receiver');
    const dir = openDataDir(opts.data, { forWriting: true });
    const schedule = { policy: resolvePolicy(dir.config.retention), intervalMs: parseDurationMs(opts.pruneInterval ?? dir.config.pruneInterval ?? '1h') };
    const server = await ReceiverServer.start(dir, match[1]!.replace(/^\[|\]$/g, ''), Number(match[2]), log, schedule);
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

program.command('prune')
  .description('apply the retention policy: drop points, fold what kept points need, free and compact storage')
  .addOption(dataOption())
  .option('--keep-within <duration>', 'keep every point this recent (default 1h)')
  .option('--keep-hourly <n>', 'keep the newest point of each of the last N hours with points (default 24)', parseIntOption('--keep-hourly', 0, 1_000_000))
  .option('--keep-daily <n>', 'the same per day (default 7)', parseIntOption('--keep-daily', 0, 1_000_000))
  .option('--keep-weekly <n>', 'the same per week (default 0)', parseIntOption('--keep-weekly', 0, 1_000_000))
  .option('--dry-run', 'show what would be dropped and freed; change nothing')
  .option('--now <time>', 'evaluate the policy as of this time (ISO-8601; for planning)')
  .option('--json', 'print one JSON document')
  .action((opts: PruneFlags) => {
    const dir = openDataDir(opts.data, { forWriting: true });
    const nowMs = opts.now === undefined ? Date.now() : Date.parse(opts.now);
    if (Number.isNaN(nowMs)) throw new TidemarkError('E_USAGE', `invalid --now "${opts.now}": use an ISO-8601 time`);
    const policy = resolvePolicy(dir.config.retention, { keepWithin: opts.keepWithin, keepHourly: opts.keepHourly, keepDaily: opts.keepDaily, keepWeekly: opts.keepWeekly });
    const catalog = Catalog.open(dir.catalogPath);
    try {
      const log = createLogger('tidemark-receiver', 'warn');
      const report = prune(catalog, dir.packDir, { policy, nowMs, dryRun: !!opts.dryRun, log });
      if (opts.json) return printJson(report);
      for (const h of report.hosts) {
        process.stdout.write(`host ${h.host}: keep ${h.kept.length} point(s), ${opts.dryRun ? 'would drop' : 'dropped'} ${h.dropped.length}${h.dropped.length ? ` (${h.dropped.map((d) => d.id).join(', ')})` : ''}\n`);
      }
      process.stdout.write(`${opts.dryRun ? 'would free' : 'freed'} ${report.chunksFreed} chunks (${formatBytes(report.bytesFreed)}); ` +
        `packs ${formatBytes(report.packBytesBefore)} → ${formatBytes(report.packBytesAfter)}, ${report.packsCompacted} compacted\n`);
    } finally {
      catalog.close();
    }
  });

interface PruneFlags {
  data: string; keepWithin?: string; keepHourly?: number; keepDaily?: number; keepWeekly?: number; dryRun?: boolean; now?: string; json?: boolean;
}

program.command('status')
  .description('hosts, disks, last point, lag and stored bytes')
  .addOption(dataOption())
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; json?: boolean }) => {
    const dir = openDataDir(opts.data);
    const catalog = Catalog.open(dir.catalogPath);
    try {
      const status = catalog.status();
      // What the configured policy would drop and free now: the real prune, rolled back.
      const plan = prune(catalog, dir.packDir, { policy: resolvePolicy(dir.config.retention), nowMs: Date.now(), dryRun: true });
      const pruneWouldFree = { points: plan.pointsDropped, chunks: plan.chunksFreed, bytes: plan.bytesFreed };
      if (opts.json) return printJson({ fingerprint: dir.fingerprint, ...status, pruneWouldFree });
      process.stdout.write(`fingerprint ${dir.fingerprint}\nstored: ${status.storedChunks} chunks, ${formatBytes(status.storedChunkBytes)} ` +
        `in pack files of ${formatBytes(status.packBytes)}; ` +
        `catalog ${formatBytes(status.catalogBytes)} for ${status.blockVersions} block versions; a prune now would drop ${plan.pointsDropped} points and free ${formatBytes(plan.bytesFreed)}\n`);
      for (const h of status.hosts) {
        const last = h.lastPoint ? `last point ${h.lastPoint.id} at ${h.lastPoint.time} (lag ${Math.round(h.lagSeconds!)}s)` : 'no point yet';
        const agent = h.reportedAt ? ` [${h.tracker ?? 'no tracker'}, backlog ${formatBytes(h.backlogBytes ?? 0)}, ${formatBytes(h.bytesPerSecond ?? 0)}/s, reported ${h.reportedAt}]` : '';
        process.stdout.write(`host ${h.name}: ${h.state}${h.reason ? ` (${h.reason})` : ''}${agent}, ${h.points} points, ${last}\n`);
        for (const d of h.disks) process.stdout.write(`  disk ${d.name}: ${formatBytes(d.sizeBytes)}, ${d.blockBytes / 1024} KiB blocks\n`);
      }
    } finally {
      catalog.close();
    }
  });

program.command('verify')
  .description('check every pack file, chunk entry and the catalog without the key (safe while serve runs); exit 5 on damage')
  .addOption(dataOption())
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; json?: boolean }) => runReceiverVerify(openDataDir(opts.data), opts.json === true));

await runCli(program);
