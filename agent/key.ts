// `tidemark-agent key`: key hygiene (SPEC §6.1). Shows where the vault key
// file is, what protects it and how to back it up; `--check` opens it with the
// passphrase (exit 3 on a wrong one), so a backup copy can be proven good
// before it is needed.
import { statSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { passphraseFileOption, printJson, readPassphrase } from '../shared/cli-util.js';
import { TidemarkError } from '../shared/errors.js';
import { openKeyFile, readKeyFile } from '../shared/keyfile.js';
import { AgentState } from './state.js';

interface KeyOptions {
  keyFile?: string;
  state?: string;
  check?: boolean;
  passphraseFile?: string;
  json?: boolean;
}

export interface KeyReport {
  keyFile: string;
  format: string;
  version: number;
  createdAt: string;
  kdf: { name: string; N: number; r: number; p: number };
  cipher: string;
  /** Permission bits of the key file, octal. */
  mode: string;
  /** From the passphrase (--check) or the enrollment (--state); null when neither is available. */
  vaultId: string | null;
  vaultIdSource: 'passphrase' | 'enrollment' | null;
  /** The host enrolled in --state, if given. */
  host: string | null;
  /** The passphrase opened the key file. */
  checked: boolean;
  warnings: string[];
  backup: string[];
}

export function backupInstructions(keyFile: string): string[] {
  return [
    'Losing this key file or its passphrase loses every recovery point of the vault: the receiver holds only ciphertext and cannot decrypt it.',
    `Copy the key file away from this host now (it is encrypted under the passphrase): cp ${keyFile} /secure/offsite/location/`,
    'Keep the passphrase separately from the copy, e.g. in a password manager; the key file is useless without it.',
    'Every host enrolled with a copy of this file is in the same vault: a copy from any of them restores all of them.',
    'Prove a backup copy opens: tidemark-agent key --key-file COPY --check (exit 0 = OK, exit 3 = wrong passphrase or damaged file).',
  ];
}

export function keyReport(opts: KeyOptions): KeyReport {
  if (!opts.keyFile && !opts.state) throw new TidemarkError('E_USAGE', 'pass --key-file FILE, or --state DIR to use the key file of that enrollment');
  let enrollment: { host: string; keyFile: string; vaultId: string } | undefined;
  if (opts.state) {
    const state = AgentState.open(opts.state, { mustBeEnrolled: true });
    try {
      enrollment = state.enrollment()!;
    } finally {
      state.close();
    }
  }
  const keyFile = resolve(opts.keyFile ?? enrollment!.keyFile);
  const file = readKeyFile(keyFile);
  const mode = statSync(keyFile).mode & 0o777;
  const warnings: string[] = [];
  if (mode & 0o077) warnings.push(`key file ${keyFile} is readable by other users (mode ${mode.toString(8).padStart(4, '0')}): chmod 600 ${keyFile}`);
  let vaultId: string | null = enrollment?.vaultId ?? null;
  let vaultIdSource: KeyReport['vaultIdSource'] = enrollment ? 'enrollment' : null;
  if (opts.check) {
    const keys = VaultKeys.fromMaster(openKeyFile(keyFile, readPassphrase(opts.passphraseFile)));
    if (enrollment && keys.vaultId !== enrollment.vaultId) {
      throw new TidemarkError('E_KEY_FILE', `key file ${keyFile} opens, but it belongs to vault ${keys.vaultId}, not vault ${enrollment.vaultId} that host ${enrollment.host} was enrolled with; use that vault's key file`);
    }
    vaultId = keys.vaultId;
    vaultIdSource = 'passphrase';
  }
  return {
    keyFile, format: file.format, version: file.version, createdAt: file.createdAt,
    kdf: { name: file.kdf.name, N: file.kdf.N, r: file.kdf.r, p: file.kdf.p }, cipher: file.cipher,
    mode: mode.toString(8).padStart(4, '0'), vaultId, vaultIdSource, host: enrollment?.host ?? null,
    checked: !!opts.check, warnings, backup: backupInstructions(keyFile),
  };
}

export function registerKeyCommand(program: Command): void {
  program.command('key')
    .description('show the vault key file, its protection and how to back it up; --check opens it with the passphrase')
    .option('--key-file <file>', 'vault key file')
    .option('--state <dir>', 'agent state directory: use the key file of its enrollment')
    .option('--check', 'open the key file with the passphrase (TIDEMARK_PASSPHRASE or --passphrase-file); exit 3 if it does not open')
    .addOption(passphraseFileOption())
    .option('--json', 'print one JSON document')
    .action((opts: KeyOptions) => {
      const report = keyReport(opts);
      if (opts.json) return printJson(report);
      const vault = report.vaultId
        ? `${report.vaultId}${report.vaultIdSource === 'enrollment' ? ` (as enrolled; --check confirms it with the passphrase)` : ''}`
        : 'shown with --check (needs the passphrase)';
      const lines = [
        `key file   ${report.keyFile} (mode ${report.mode})`,
        ...(report.host ? [`host       ${report.host}`] : []),
        `vault      ${vault}`,
        `created    ${report.createdAt}`,
        `protection ${report.cipher}, key from the passphrase by ${report.kdf.name} N=${report.kdf.N} r=${report.kdf.r} p=${report.kdf.p}`,
        '',
        ...report.warnings.map((w) => `WARNING: ${w}`),
        ...(report.warnings.length ? [''] : []),
        'Backup:',
        ...report.backup.map((b) => `  - ${b}`),
      ];
      if (report.checked) lines.push('', `OK: the passphrase opens ${report.keyFile} (vault ${report.vaultId})`);
      process.stdout.write(lines.join('\n') + '\n');
    });
}
