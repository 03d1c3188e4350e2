// tidemark-receiver: init, serve, token, revoke, prune, status, verify (CLI contract: DESIGN §9, README).
import { statfsSync } from 'node:fs';
import { Command, Option } from 'commander';
import { TidemarkError } from '../shared/errors.js';
import { parseIntOption, printJson, printable, runCli } from '../shared/cli-util.js';
import { createLogger } from '../shared/log.js';
import { formatBytes, parseDurationMs } from '../shared/units.js';
import { prune } from './prune.js';
import { resolvePolicy } from './retention.js';
import { Catalog, tokenIdOf, type TokenInfo } from './catalog.js';
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
  .description('create a one-time enrollment token (--host: one that re-enrolls an existing host; --restore: a read-only restore token), or list them')
  .addOption(dataOption())
  .addOption(new Option('--restore', 'a reusable read-only token for tidemark-restore').conflicts('host'))
  .option('--host <name>', 'an enrollment token that gives this enrolled host a new credential (same name and key file; its points carry on)')
  .option('--expires <duration>', 'the token stops working this long from now, e.g. 24h or 7d (default: never, until revoked)')
  .addOption(new Option('--list', 'list the tokens (ids, kinds, use, expiry), never their secrets').conflicts(['restore', 'host', 'expires']))
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; restore?: boolean; host?: string; expires?: string; list?: boolean; json?: boolean }) => {
    const validForMs = opts.expires === undefined ? undefined : parseDurationMs(opts.expires);
    if (validForMs !== undefined && validForMs <= 0) throw new TidemarkError('E_USAGE', `--expires ${opts.expires}: give a duration longer than zero, e.g. 24h`);
    const expiresMs = validForMs === undefined ? undefined : Date.now() + validForMs;
    const dir = openDataDir(opts.data);
    const catalog = Catalog.open(dir.catalogPath);
    try {
      if (opts.list) return printTokens(catalog.listTokens(), opts.json === true);
      const kind = opts.restore ? 'restore' : 'enroll';
      const token = catalog.createToken(kind, { reenrollHost: opts.host, expiresMs });
      if (opts.json) return printJson({ token, id: tokenIdOf(token), kind, host: opts.host ?? null, expiresAt: expiresMs === undefined ? null : new Date(expiresMs).toISOString() });
      process.stdout.write(`${token}\n`);
    } finally {
      catalog.close();
    }
  });

function printTokens(tokens: TokenInfo[], json: boolean): void {
  if (json) return printJson({ tokens });
  for (const t of tokens) {
    const use = t.kind === 'restore' ? 'reusable' : t.usedAt ? `used ${t.usedAt}${t.host ? ` by host ${printable(t.host)}` : ''}` : t.host ? `unused, re-enrolls host ${printable(t.host)}` : 'unused';
    const expiry = t.expiresAt === null ? '' : `  ${Date.parse(t.expiresAt) > Date.now() ? 'expires' : 'expired'} ${t.expiresAt}`;
    process.stdout.write(`${t.id}  ${t.kind.padEnd(7)}  created ${t.createdAt}  ${use}${expiry}\n`);
  }
  if (tokens.length === 0) process.stdout.write('no tokens\n');
}

program.command('revoke')
  .description('stop a host credential or a token from working; open sessions using it are closed within 15 s')
  .addOption(dataOption())
  .addOption(new Option('--host <name>', "revoke the host's credential (its points stay; token --host re-enrolls it)").conflicts('token'))
  .option('--token <id>', 'revoke the token with this id (from token --list)')
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; host?: string; token?: string; json?: boolean }) => {
    if ((opts.host === undefined) === (opts.token === undefined)) throw new TidemarkError('E_USAGE', 'say what to revoke: --host NAME or --token ID');
    const dir = openDataDir(opts.data);
    const catalog = Catalog.open(dir.catalogPath);
    try {
      if (opts.host !== undefined) {
        const revoked = catalog.revokeHost(opts.host);
        if (opts.json) return printJson({ revoked: 'host', ...revoked });
        process.stdout.write(revoked.alreadyRevoked
          ? `host ${revoked.host}'s credential was already revoked at ${revoked.revokedAt}; nothing changed (token --host ${revoked.host} enrolls it again)\n`
          : `revoked the credential of host ${revoked.host}; its points stay readable with a restore token\n`);
      } else {
        const { token, revokedAt, alreadyRevoked } = catalog.revokeToken(opts.token!);
        if (opts.json) return printJson({ revoked: 'token', token, revokedAt, alreadyRevoked });
        process.stdout.write(alreadyRevoked
          ? `${token.kind} token ${token.id} was already revoked at ${revokedAt}; nothing changed\n`
          : `revoked ${token.kind} token ${token.id}\n`);
      }
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
        process.stdout.write(`host ${printable(h.host)}: keep ${h.kept.length} point(s), ${opts.dryRun ? 'would drop' : 'dropped'} ${h.dropped.length}${h.dropped.length ? ` (${h.dropped.map((d) => d.id).join(', ')})` : ''}\n`);
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

program.command('forget')
  .description("remove a disk's recovery points (--disk), or a host and all of its points (--all); the next prune frees the space")
  .addOption(dataOption())
  .requiredOption('--host <name>', 'the host')
  .addOption(new Option('--disk <name>', 'the disk to forget, as points list it').conflicts('all'))
  .option('--all', 'forget the host itself: every disk and point, and its credential')
  .option('--dry-run', 'show what would be removed; change nothing')
  .option('--json', 'print one JSON document')
  .action((opts: { data: string; host: string; disk?: string; all?: boolean; dryRun?: boolean; json?: boolean }) => {
    if (opts.disk === undefined && !opts.all) throw new TidemarkError('E_USAGE', 'say what to forget: --disk NAME, or --all for the host and everything of it');
    const dir = openDataDir(opts.data, { forWriting: true });
    const catalog = Catalog.open(dir.catalogPath);
    try {
      const report = catalog.forget(opts.host, opts.disk ?? null, { dryRun: opts.dryRun });
      if (opts.json) return printJson({ dryRun: !!opts.dryRun, ...report });
      const disks = report.disks.map(printable); // names its agent chose
      const what = report.hostRemoved ? `host ${printable(report.host)} and its disks ${disks.join(', ') || '(none)'}` : `disk ${disks[0]} of host ${printable(report.host)}`;
      process.stdout.write(opts.dryRun
        ? `would forget ${what}: ${report.pointsRemoved} point(s) and ${report.blockVersionsRemoved} block versions\n`
        : `forgot ${what}: ${report.pointsRemoved} point(s) and ${report.blockVersionsRemoved} block versions removed; ` +
          'tidemark-receiver prune frees their space (serve runs it on its schedule)\n');
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
      // What the configured policy would drop and free now: the real prune, rolled back.
      const plan = prune(catalog, dir.packDir, { policy: resolvePolicy(dir.config.retention), nowMs: Date.now(), dryRun: true });
      const pruneWouldFree = { points: plan.pointsDropped, chunks: plan.chunksFreed, bytes: plan.bytesFreed };
      // The filesystem of the data directory: a full one stops every host (E_STORAGE), whatever they last reported.
      const fs = statfsSync(dir.root);
      const space = { freeBytes: fs.bavail * fs.bsize, totalBytes: fs.blocks * fs.bsize };
      if (opts.json) return printJson({ fingerprint: dir.fingerprint, ...status, pruneWouldFree, space });
      process.stdout.write(`fingerprint ${dir.fingerprint}\nspace: ${formatBytes(space.freeBytes)} free of ${formatBytes(space.totalBytes)} on ${dir.root}\n` +
        `stored: ${status.storedChunks} chunks, ${formatBytes(status.storedChunkBytes)} ` +
        `in pack files of ${formatBytes(status.packBytes)}; ` +
        `catalog ${formatBytes(status.catalogBytes)} for ${status.blockVersions} block versions; a prune now would drop ${plan.pointsDropped} points and free ${formatBytes(plan.bytesFreed)}\n`);
      for (const h of status.hosts) {
        const last = h.lastPoint ? `last point ${h.lastPoint.id} at ${h.lastPoint.time} (lag ${Math.round(h.lagSeconds!)}s)` : 'no point yet';
        const agent = h.reportedAt ? ` [${h.tracker ?? 'no tracker'}, backlog ${formatBytes(h.backlogBytes ?? 0)}, ${formatBytes(h.bytesPerSecond ?? 0)}/s, reported ${h.reportedAt}]` : '';
        const name = printable(h.name); // names and reason are what agents sent
        const revoked = h.credentialRevokedAt ? `, credential revoked ${h.credentialRevokedAt} (token --host ${name} to enroll it again)` : '';
        process.stdout.write(`host ${name}: ${h.state}${h.reason ? ` (${printable(h.reason)})` : ''}${agent}, ${h.points} points, ${last}${revoked}\n`);
        for (const d of h.disks) process.stdout.write(`  disk ${printable(d.name)}: ${formatBytes(d.sizeBytes)}, ${d.blockBytes / 1024} KiB blocks\n`);
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
