// tidemark-agent: enroll, scan, run, status (CLI contract: DESIGN §9, README).
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import { openKeyFile } from '../shared/keyfile.js';
import { createLogger } from '../shared/log.js';
import { DEFAULT_BLOCK_BYTES, MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from '../shared/protocol.js';
import { passphraseFileOption, printJson, readPassphrase, readToken, runCli } from '../shared/cli-util.js';
import { formatBytes, parseDurationMs, parseSizeBytes } from '../shared/units.js';
import { describeDisk, listBlockDevices } from './disks.js';
import { KEY_BACKUP_WARNING, enroll } from './enroll.js';
import { AgentState } from './state.js';
import { syncOnce, type SyncResult } from './sync.js';

const program = new Command('tidemark-agent').description('Tidemark agent: replicates this host\'s disks to a receiver');

program.command('enroll')
  .description('enroll this host with a receiver using a one-time token; creates the key file if absent')
  .requiredOption('--state <dir>', 'agent state directory')
  .requiredOption('--receiver <url>', 'receiver address, wss://HOST:PORT')
  .requiredOption('--fingerprint <fp>', 'receiver TLS certificate fingerprint (from tidemark-receiver init)')
  .option('--token <token>', 'one-time enrollment token (or TIDEMARK_TOKEN)')
  .requiredOption('--key-file <file>', 'vault key file (created if absent; passphrase from TIDEMARK_PASSPHRASE)')
  .option('--host <name>', 'name of this host on the receiver (default: hostname)')
  .addOption(passphraseFileOption())
  .option('--json', 'print the result as JSON')
  .action(async (opts: { state: string; receiver: string; fingerprint: string; token?: string; keyFile: string; host?: string; passphraseFile?: string; json?: boolean }) => {
    const result = await enroll({
      stateDir: opts.state, receiverUrl: opts.receiver, fingerprint: opts.fingerprint, token: readToken(opts.token),
      keyFile: opts.keyFile, host: opts.host, passphrase: readPassphrase(opts.passphraseFile),
    });
    if (result.keyCreated) process.stderr.write(KEY_BACKUP_WARNING(opts.keyFile));
    if (opts.json) return printJson(result);
    process.stdout.write(`Enrolled host ${result.host} (vault ${result.vaultId}) with ${opts.receiver}\n`);
  });

program.command('scan')
  .description('list disks with size, sector size and bytes holding data')
  .argument('[paths...]', 'disks or image files (default: every block device in /sys/block)')
  .option('--json', 'print one JSON document')
  .action(async (paths: string[], opts: { json?: boolean }) => {
    const targets = paths.length > 0 ? paths : await listBlockDevices();
    const disks = [];
    for (const path of targets) disks.push(await describeDisk(path, { measureData: true }));
    if (opts.json) return printJson({ disks });
    for (const d of disks) {
      process.stdout.write(`${d.path}\t${d.kind}\t${formatBytes(d.sizeBytes)}\tsector ${d.sectorBytes}\tdata ${formatBytes(d.dataBytes)}\n`);
    }
  });

program.command('run')
  .description('replicate the disks: continuously, or one cycle with --once')
  .requiredOption('--state <dir>', 'agent state directory')
  .option('--disk <path>', 'disk or image file to protect (repeatable)', (v: string, all: string[]) => [...all, v], [] as string[])
  .option('--interval <duration>', 'time between recovery points', '10s')
  .option('--block-size <size>', 'block size for disks synced the first time (power of two, 4K..1M)', '64K')
  .option('--bwlimit <size>', 'cap on bytes sent per second, e.g. 20M (default: unlimited)')
  .addOption(new Option('--tracker <kind>', 'change tracking').choices(['auto', 'tracefs', 'scan']).default('auto'))
  .option('--once', 'one sync cycle (initial or incremental), commit one point, exit')
  .addOption(passphraseFileOption())
  .option('--json', 'progress and the result as JSON lines on stdout')
  .action(async (opts: RunOptions) => {
    if (opts.disk.length === 0) throw new TidemarkError('E_USAGE', 'no disk given: pass --disk PATH (repeatable)');
    if (opts.tracker === 'tracefs') throw new TidemarkError('E_USAGE', 'the tracefs tracker is not available in this version; use --tracker scan (or auto)');
    const blockBytes = parseSizeBytes(opts.blockSize);
    if (blockBytes < MIN_BLOCK_BYTES || blockBytes > MAX_BLOCK_BYTES || (blockBytes & (blockBytes - 1)) !== 0) {
      throw new TidemarkError('E_USAGE', `--block-size must be a power of two from 4K to 1M (got ${opts.blockSize})`);
    }
    const intervalMs = parseDurationMs(opts.interval);
    const bytesPerSecond = opts.bwlimit ? parseSizeBytes(opts.bwlimit) : 0;
    const state = AgentState.open(opts.state, { mustBeEnrolled: true });
    const log = createLogger('tidemark-agent', opts.once ? 'warn' : 'info');
    try {
      const keys = VaultKeys.fromMaster(openKeyFile(state.enrollment()!.keyFile, readPassphrase(opts.passphraseFile)));
      state.saveStatus({ tracker: 'scan', reason: opts.tracker === 'auto' ? 'hash scan (kernel tracking is not available in this version)' : 'hash scan' });
      // Disks are named by absolute path: `disk.img` and `./disk.img` are one disk.
      const sync = () => syncOnce({ state, keys, diskPaths: opts.disk.map((p) => resolve(p)), blockBytes: blockBytes || DEFAULT_BLOCK_BYTES, bytesPerSecond, json: !!opts.json, log });
      if (opts.once) {
        const result = await sync();
        reportResult(result, !!opts.json);
        if (result.crashConsistent) state.saveStatus({ reason: 'run --once finished; changes are not replicated until the next run' });
        return;
      }
      await runContinuously(state, sync, intervalMs, !!opts.json, log);
    } catch (err) {
      const error = asTidemarkError(err);
      state.saveStatus({ state: 'Error', reason: error.message });
      throw error;
    } finally {
      state.close();
    }
  });

interface RunOptions {
  state: string; disk: string[]; interval: string; blockSize: string; bwlimit?: string;
  tracker: 'auto' | 'tracefs' | 'scan'; once?: boolean; passphraseFile?: string; json?: boolean;
}

function reportResult(result: SyncResult, json: boolean): void {
  if (json) return void process.stdout.write(JSON.stringify({ event: 'point', ...result }) + '\n');
  process.stdout.write(
    `point ${result.pointId} at ${result.time}${result.crashConsistent ? '' : ' (NOT crash-consistent)'}: ` +
    `read ${formatBytes(result.bytesRead)}, ${result.blocksChanged} blocks changed, ` +
    `uploaded ${result.chunksUploaded} chunks (${formatBytes(result.bytesUploaded)}), ${result.chunksDeduplicated} already stored, ` +
    `${(result.durationMs / 1000).toFixed(1)} s\n`,
  );
}

/** Hash-scan replication: one cycle per interval; retryable failures back off and retry. */
async function runContinuously(state: AgentState, sync: () => Promise<SyncResult>, intervalMs: number, json: boolean, log: ReturnType<typeof createLogger>): Promise<void> {
  let stopping = false;
  let wake: () => void = () => {};
  const stop = () => {
    stopping = true;
    wake();
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  let backoffMs = 1000;
  while (!stopping) {
    const startedMs = Date.now();
    let delayMs: number;
    try {
      reportResult(await sync(), json);
      backoffMs = 1000;
      delayMs = Math.max(0, intervalMs - (Date.now() - startedMs));
    } catch (err) {
      const error = asTidemarkError(err);
      if (!error.retryable) throw error;
      state.saveStatus({ state: 'Error', reason: `${error.message} (retrying in ${Math.round(backoffMs / 1000)} s)` });
      log.warn({ code: error.code, reason: error.message, retryInMs: backoffMs }, 'sync failed; will retry');
      delayMs = backoffMs;
      backoffMs = Math.min(backoffMs * 2, 60_000);
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, delayMs);
      wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}

program.command('status')
  .description('state, lag, last point and disks of this agent')
  .requiredOption('--state <dir>', 'agent state directory')
  .option('--json', 'print one JSON document')
  .action((opts: { state: string; json?: boolean }) => {
    const state = AgentState.open(opts.state, { mustBeEnrolled: true });
    try {
      const enrollment = state.enrollment()!;
      const s = state.status();
      const doc = {
        host: enrollment.host,
        receiver: enrollment.receiverUrl,
        state: s.state,
        reason: s.reason,
        tracker: s.tracker,
        lagSeconds: s.lastPointTimeMs === null ? null : Math.max(0, (Date.now() - s.lastPointTimeMs) / 1000),
        backlogBytes: s.backlogBytes,
        lastPoint: s.lastPointId === null ? null : { id: s.lastPointId, time: new Date(s.lastPointTimeMs!).toISOString(), crashConsistent: s.lastPointConsistent },
        progress: s.progress,
        updatedAt: new Date(s.updatedMs).toISOString(),
        disks: state.disks().map((d) => ({ name: d.path, diskId: d.diskId, sizeBytes: d.sizeBytes, blockBytes: d.blockBytes, synced: d.hasBaseline })),
      };
      if (opts.json) return printJson(doc);
      process.stdout.write(`host ${doc.host} → ${doc.receiver}\nstate ${doc.state}${doc.reason ? ` (${doc.reason})` : ''}, tracker ${doc.tracker}\n`);
      process.stdout.write(doc.lastPoint ? `last point ${doc.lastPoint.id} at ${doc.lastPoint.time}, lag ${Math.round(doc.lagSeconds!)} s\n` : 'no point yet\n');
      for (const d of doc.disks) process.stdout.write(`  ${d.name}: ${formatBytes(d.sizeBytes)}, ${d.blockBytes / 1024} KiB blocks${d.synced ? '' : ', initial sync not finished'}\n`);
    } finally {
      state.close();
    }
  });

await runCli(program);
