#!/usr/bin/env node
// Checks Grafana dashboard JSON files against Grafana's own definitions,
// with the TypeScript compiler in strict mode:
//   - the dashboard, its panels and rows, variables, annotations:
//     `Dashboard`, `Panel`, `RowPanel` of @grafana/schema (the types Grafana's
//     frontend is built with, generated from its CUE schema kinds);
//   - each panel's `options` and `fieldConfig.defaults.custom`: the
//     `Options` / `FieldConfig` of that panel plugin in @grafana/schema
//     (raw/composable/<plugin>/panelcfg). Grafana fills missing options with
//     the plugin's defaults, so these two are checked as deep partials: a
//     wrong type or an unknown key fails, a left-out key does not;
//   - each Prometheus query: `Dataquery` of @grafana/grafana-foundation-sdk
//     (Grafana's generated Prometheus query schema) plus the common
//     `DataQuery` of @grafana/schema (refId required).
// The JSON is written into a .ts file as object literals assigned to those
// types, so tsc reports wrong types, missing required fields and unknown
// keys (excess properties). String enums accept their values.
//
// Usage: node check.mjs --modules DIR FILE.json...
//   DIR: where `npm ci` of this directory's package.json installed
//   node_modules (the lock pins the versions). Exit 0: all files pass;
//   1: schema errors (printed with the JSON place); 2: usage or setup error.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

function usage(msg) {
  process.stderr.write(`check.mjs: ${msg}\nusage: node check.mjs --modules DIR FILE.json...\n`);
  process.exit(2);
}

const argv = process.argv.slice(2);
let modules = null;
const files = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--modules') {
    modules = argv[++i];
  } else if (argv[i].startsWith('-')) {
    usage(`unknown option ${argv[i]}`);
  } else {
    files.push(argv[i]);
  }
}
if (!modules || files.length === 0) {
  usage('need --modules DIR and at least one dashboard');
}
modules = path.resolve(modules);
const nm = path.join(modules, 'node_modules');
const tsc = path.join(nm, 'typescript', 'bin', 'tsc');
const schemaPkg = path.join(nm, '@grafana', 'schema', 'package.json');
const sdkPkg = path.join(nm, '@grafana', 'grafana-foundation-sdk', 'package.json');
for (const p of [tsc, schemaPkg, sdkPkg]) {
  if (!fs.existsSync(p)) {
    usage(`${p} is missing: run npm ci in ${modules} (a copy of deploy/observability/schema-check)`);
  }
}
const schemaVersion = JSON.parse(fs.readFileSync(schemaPkg, 'utf8')).version;
const sdkVersion = JSON.parse(fs.readFileSync(sdkPkg, 'utf8')).version;

// Panel plugin id -> module of its panelcfg types, from the package's exports
// (directory names differ from a few plugin ids).
const rename = {
  annotationslist: 'annolist',
  dashboardlist: 'dashlist',
  nodegraph: 'nodeGraph',
  statushistory: 'status-history',
};
const panelcfg = {};
const exportsMap = JSON.parse(fs.readFileSync(schemaPkg, 'utf8')).exports ?? {};
for (const key of Object.keys(exportsMap)) {
  const m = key.match(/^\.\/(dist\/esm\/raw\/composable\/([a-z0-9]+)\/panelcfg\/x\/[A-Za-z0-9]+_types\.gen)$/);
  if (m) {
    const dts = path.join(nm, '@grafana', 'schema', exportsMap[key].types);
    const text = fs.existsSync(dts) ? fs.readFileSync(dts, 'utf8') : '';
    panelcfg[rename[m[2]] ?? m[2]] = {
      module: `@grafana/schema/${m[1]}`,
      fieldConfig: /export interface FieldConfig\b/.test(text),
    };
  }
}
if (!panelcfg.timeseries) {
  usage(`@grafana/schema ${schemaVersion} exports no timeseries panelcfg: unexpected package layout`);
}

const lit = (v) => JSON.stringify(v, null, 2);
const ident = (s) => s.replace(/[^A-Za-z0-9_]/g, '_');

function generate(dash, where) {
  const imports = new Map();
  const out = [];
  const notes = [];
  const decl = (name, type, value, place) => {
    out.push(`// ${place}`);
    out.push(`export const ${name}: ${type} = ${lit(value)};`);
    notes.push({ name, place });
  };
  // the panels are checked one by one below, each against Panel or RowPanel
  // (stricter than the dashboard's Array<Panel | RowPanel>)
  const top = typeof dash === 'object' && dash !== null && Array.isArray(dash.panels) ? { ...dash, panels: [] } : dash;
  decl('dashboard', 'Json<S.Dashboard>', top, 'the dashboard');
  const panel = (p, place) => {
    if (typeof p !== 'object' || p === null || Array.isArray(p)) {
      decl(`p_${ident(place)}`, 'Json<S.Panel>', p, place);
      return;
    }
    const name = `p_${ident(place)}`;
    if (p.type === 'row') {
      decl(name, 'Json<S.RowPanel>', p, `${place} (row "${p.title ?? ''}")`);
      (Array.isArray(p.panels) ? p.panels : []).forEach((q, i) => panel(q, `${place}.panels[${i}]`));
      return;
    }
    decl(name, 'Json<S.Panel>', p, `${place} (${p.type} "${p.title ?? ''}")`);
    const cfg = panelcfg[p.type];
    if (!cfg) {
      out.push(`// ${place}: panel type ${JSON.stringify(p.type)} has no panelcfg in @grafana/schema`);
      out.push(`export const ${name}_unknown_type: never = ${lit(p.type)};`);
      notes.push({ name: `${name}_unknown_type`, place: `${place}.type` });
    } else {
      const alias = `P_${ident(p.type)}`;
      imports.set(alias, cfg.module);
      if (p.options !== undefined) {
        decl(`${name}_options`, `Loose<${alias}.Options>`, p.options, `${place}.options (${p.type} Options)`);
      }
      const custom = p.fieldConfig?.defaults?.custom;
      if (custom !== undefined) {
        const t = cfg.fieldConfig ? `Loose<${alias}.FieldConfig>` : 'Record<string, never>';
        decl(`${name}_custom`, t, custom, `${place}.fieldConfig.defaults.custom (${p.type} FieldConfig)`);
      }
    }
    (Array.isArray(p.targets) ? p.targets : []).forEach((t, i) => {
      const ds = t?.datasource?.type ?? p.datasource?.type;
      const type = ds === 'prometheus' ? 'Json<Prom.Dataquery> & Json<S.DataQuery>' : 'Json<S.DataQuery> & Record<string, unknown>';
      decl(`${name}_target_${i}`, type, t, `${place}.targets[${i}] (${ds ?? 'no datasource type'} query)`);
    });
  };
  (Array.isArray(dash.panels) ? dash.panels : []).forEach((p, i) => panel(p, `panels[${i}]`));
  const head = [
    "import type * as S from '@grafana/schema';",
    "import type * as Prom from '@grafana/grafana-foundation-sdk/prometheus';",
    ...[...imports].map(([a, m]) => `import type * as ${a} from '${m}';`),
    '',
    '// A JSON value of type T: string enums take their values, methods go.',
    'type Fn = (...args: never[]) => unknown;',
    'type Json<T> = T extends Fn ? never',
    '  : T extends string ? `${T}`',
    '  : T extends number | boolean | null | undefined ? T',
    '  : T extends ReadonlyArray<infer E> ? Array<Json<E>>',
    '  : T extends object ? { [K in keyof T as T[K] extends Fn ? never : K]: Json<T[K]> }',
    '  : T;',
    '// The same, every key optional at every depth (Grafana fills in defaults).',
    'type Loose<T> = T extends Fn ? never',
    '  : T extends string ? `${T}`',
    '  : T extends number | boolean | null | undefined ? T',
    '  : T extends ReadonlyArray<infer E> ? Array<Loose<E>>',
    '  : T extends object ? { [K in keyof T as T[K] extends Fn ? never : K]?: Loose<T[K]> }',
    '  : T;',
    '',
  ];
  return { text: head.concat(out).join('\n') + '\n', notes };
}

class SetupError extends Error {}
const work = fs.mkdtempSync(path.join(modules, 'gen-'));
let failed = false;
let setup = null;
try {
  const sources = [];
  const notesByFile = new Map();
  files.forEach((f, i) => {
    let dash;
    try {
      dash = JSON.parse(fs.readFileSync(f, 'utf8'));
    } catch (e) {
      process.stdout.write(`${f}: not valid JSON: ${e.message}\n`);
      failed = true;
      return;
    }
    const { text, notes } = generate(dash, f);
    const ts = path.join(work, `dashboard_${i}.ts`);
    fs.writeFileSync(ts, text);
    sources.push(ts);
    notesByFile.set(ts, { file: f, lines: text.split('\n'), notes });
  });
  if (sources.length > 0) {
    const tsconfig = {
      compilerOptions: {
        strict: true,
        noEmit: true,
        target: 'es2022',
        module: 'esnext',
        moduleResolution: 'bundler',
        skipLibCheck: true,
        types: [],
      },
      files: sources.map((s) => path.basename(s)),
    };
    fs.writeFileSync(path.join(work, 'tsconfig.json'), JSON.stringify(tsconfig, null, 2));
    const r = spawnSync(process.execPath, [tsc, '-p', work, '--pretty', 'false'], { encoding: 'utf8' });
    if (r.error) {
      throw new SetupError(`running tsc: ${r.error.message}`);
    }
    const diag = `${r.stdout}${r.stderr}`;
    if (r.status !== 0) {
      failed = true;
      if (!/error TS\d+/.test(diag)) {
        process.stdout.write(diag);
        throw new SetupError('tsc failed without a diagnostic');
      }
      // "dashboard_0.ts(12,5): error TS2322: ..." and its indented
      // elaboration lines -> one line: the file, the JSON place, the source
      // line of the generated literal, the diagnostic
      const report = [];
      for (const line of diag.split('\n')) {
        const m = line.match(/^(.*?\.ts)\((\d+),(\d+)\): (error TS\d+: .*)$/);
        if (!m) {
          if (!line.trim()) continue;
          if (report.length > 0) report[report.length - 1] += ` / ${line.trim()}`;
          else report.push(line);
          continue;
        }
        const info = notesByFile.get(path.join(work, path.basename(m[1])));
        if (!info) {
          report.push(line);
          continue;
        }
        const n = Number(m[2]);
        let place = '?';
        for (let k = n - 1; k >= 0; k--) {
          const c = info.lines[k].match(/^\/\/ (.*)$/);
          if (c && info.lines[k + 1]?.startsWith('export const ')) {
            place = c[1];
            break;
          }
        }
        const src = (info.lines[n - 1] ?? '').trim();
        report.push(`${info.file}: ${place}: at \`${src}\`: ${m[4]}`);
      }
      process.stdout.write(report.map((l) => `${l}\n`).join(''));
    }
  }
  const verdict = failed ? 'FAILED' : 'OK';
  process.stdout.write(
    `grafana schema check ${verdict}: ${files.length} dashboard(s) against @grafana/schema ${schemaVersion}, ` +
      `@grafana/grafana-foundation-sdk ${sdkVersion} (prometheus query)\n`,
  );
} catch (e) {
  if (!(e instanceof SetupError)) throw e;
  setup = e.message;
} finally {
  if (!process.env.TIDEMESH_GRAFANA_SCHEMA_KEEP) {
    fs.rmSync(work, { recursive: true, force: true });
  } else {
    process.stdout.write(`generated sources kept in ${work}\n`);
  }
}
if (setup) usage(setup);
process.exit(failed ? 1 : 0);
