#!/usr/bin/python3
"""check_deploy.py — checks deploy/ against the code it deploys (run by ctest, one part per test).

    /usr/bin/python3 tests/deploy/check_deploy.py PART --source DIR --twn BIN

PART is one of:
  manifests  every YAML file under deploy/ parses; every Kubernetes object has apiVersion, kind
             and metadata.name; the expected objects exist (coordinator Deployment + Service +
             journal PVC, gate/worker Deployments requesting nvidia.com/gpu, indexer StatefulSet
             with volumeClaimTemplates, ConfigMap, Secret, ServiceMonitor); the objects refer to
             each other consistently (selectors, named ports, volumes, claims, Secret keys, shard
             counts, endpoints); curve-secret.sh makes a Secret with real `twn keygen` keys.
  config     the ConfigMap's twn.yaml and deploy/systemd/twn.yaml pass `twn config --check` with
             the environment and flags of every pod and unit that reads them, and a broken value
             is refused (so the check is not a no-op).
  metrics    deploy/grafana/twn.json parses; every metric its PromQL uses exists, with the
             labels and label values it matches on, in real /metrics scrapes of `twn run
             --engine null`; every metric documented in common/metrics.h is on the dashboard.
  promql     a real Prometheus (Debian's prometheus) scrapes `twn run --engine null` 4 times a
             second; every dashboard query, run as a range query over the job, returns data.
  fleet      the Kubernetes pods, then the systemd units, as processes on loopback tcp with
             CURVE: each pod's args, TWN_* env and key files / each unit's ExecStart,
             Environment= and credentials, against the fleet config with only addresses, inputs,
             output dirs and the engine (null) changed.  A key not on the allow-list is refused;
             the job finishes: every item in the coordinator's summary, one dead letter, every
             role exiting 0.
  systemd    `systemd-analyze verify` prints nothing for every unit (binary path pointed at BIN).
  readme     every message in deploy/README.md's error table is printed by the code (its literal
             pieces appear in the .c files).
  container  every path the Containerfile COPYs exists; its build packages match
             scripts/setup.sh; every shared library BIN needs comes from a package the runtime
             stage installs.

Exit status: 0 pass, 1 fail (each failure printed), 77 skipped (the reason printed).
"""
import argparse
import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

SKIP = 77
SRC = "."
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL: " + msg)


_mark = [0]


def ok(msg):
    """Closes a group of checks: "ok" when none of them failed since the previous group."""
    print(("ok: " if len(failures) == _mark[0] else "NOT ok (see above): ") + msg)
    _mark[0] = len(failures)


def skip(msg):
    print("SKIP: " + msg)
    sys.exit(SKIP)


def finish():
    if failures:
        print("%d failure(s)" % len(failures))
        sys.exit(1)
    print("all checks passed")
    sys.exit(0)


# ------------------------------------------------------------------------------------------------
# Loading deploy/


def load_yaml_files(deploy):
    """{relative path: [documents]} of every .yaml/.yml under deploy/; parse errors are failures."""
    out = {}
    for root, _, files in os.walk(deploy):
        for f in sorted(files):
            if not f.endswith((".yaml", ".yml")):
                continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, deploy)
            try:
                with open(p) as fh:
                    out[rel] = [d for d in yaml.safe_load_all(fh) if d is not None]
            except yaml.YAMLError as e:
                fail("%s does not parse as YAML: %s" % (rel, e))
    return out


def k8s_objects(docs):
    """[(file, object)] of the Kubernetes objects under deploy/k8s (not the Kustomization)."""
    objs = []
    for rel, ds in docs.items():
        if not rel.startswith("k8s" + os.sep):
            continue
        for d in ds:
            if d.get("kind") == "Kustomization":
                continue
            objs.append((rel, d))
    return objs


def find(objs, kind, name):
    for _, o in objs:
        if o.get("kind") == kind and o.get("metadata", {}).get("name") == name:
            return o
    return None


def configmap_twn_yaml(objs):
    cm = find(objs, "ConfigMap", "twn-config")
    if not cm or "twn.yaml" not in cm.get("data", {}):
        return None, None
    text = cm["data"]["twn.yaml"]
    return text, yaml.safe_load(text)


def pod_specs(objs):
    """[(workload name, kind, pod spec, replicas)] of Deployments and StatefulSets."""
    out = []
    for _, o in objs:
        if o.get("kind") in ("Deployment", "StatefulSet"):
            spec = o["spec"]
            out.append((o["metadata"]["name"], o["kind"], spec["template"]["spec"],
                        spec.get("replicas", 1)))
    return out


# ------------------------------------------------------------------------------------------------
# Part: manifests


def check_manifests(src, twn):
    deploy = os.path.join(src, "deploy")
    docs = load_yaml_files(deploy)
    if not docs:
        fail("no YAML files under %s" % deploy)
        finish()
    ok("%d YAML files parse (%s)" % (len(docs), ", ".join(sorted(docs))))
    objs = k8s_objects(docs)
    for rel, o in objs:
        for field in ("apiVersion", "kind"):
            if not o.get(field):
                fail("%s: an object without %s" % (rel, field))
        if not (o.get("metadata") or {}).get("name"):
            fail("%s: %s without metadata.name" % (rel, o.get("kind")))
    ok("%d Kubernetes objects have apiVersion, kind and metadata.name" % len(objs))

    expected = [("Namespace", "twn"), ("ConfigMap", "twn-config"), ("Secret", "twn-curve"),
                ("PersistentVolumeClaim", "twn-coordinator-journal"),
                ("PersistentVolumeClaim", "twn-model"), ("Service", "twn-coordinator"),
                ("Deployment", "twn-coordinator"), ("Deployment", "twn-gate"),
                ("Deployment", "twn-worker"), ("Service", "twn-gate"), ("Service", "twn-worker"),
                ("StatefulSet", "twn-indexer"), ("Service", "twn-indexer"),
                ("ServiceMonitor", "twn"), ("NetworkPolicy", "twn")]
    for kind, name in expected:
        if not find(objs, kind, name):
            fail("no %s named %s under deploy/k8s" % (kind, name))
    ok("the expected %d objects exist" % len(expected))

    sts = find(objs, "StatefulSet", "twn-indexer")
    if sts:
        vct = sts["spec"].get("volumeClaimTemplates") or []
        if not vct:
            fail("StatefulSet twn-indexer has no volumeClaimTemplates (a PVC per shard)")
        if sts["spec"].get("serviceName") != "twn-indexer":
            fail("StatefulSet twn-indexer: serviceName %r, expected the headless Service "
                 "twn-indexer" % sts["spec"].get("serviceName"))
        svc = find(objs, "Service", "twn-indexer")
        if svc and svc["spec"].get("clusterIP") != "None":
            fail("Service twn-indexer must be headless (clusterIP: None) for per-pod DNS names")

    # GPUs: gate and worker request and limit nvidia.com/gpu.
    for name in ("twn-gate", "twn-worker"):
        d = find(objs, "Deployment", name)
        if not d:
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                if int((res.get(part) or {}).get("nvidia.com/gpu", 0)) < 1:
                    fail("%s container %s: resources.%s has no nvidia.com/gpu" %
                         (name, c["name"], part))
    ok("gate and worker request nvidia.com/gpu")

    check_references(objs, docs)
    check_shards(objs)
    check_curve_secret(src, twn, objs)
    check_kustomization(src, docs)


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_references(objs, docs):
    pvcs = {o["metadata"]["name"] for _, o in objs if o["kind"] == "PersistentVolumeClaim"}
    secret = find(objs, "Secret", "twn-curve") or {}
    secret_keys = set((secret.get("stringData") or {}).keys()) | set((secret.get("data") or {}))
    workloads = pod_specs(objs)
    for name, kind, spec, _ in workloads:
        o = find(objs, kind, name)
        sel = o["spec"]["selector"]["matchLabels"]
        tl = o["spec"]["template"]["metadata"]["labels"]
        if not labels_match(sel, tl):
            fail("%s %s: selector %s does not match the pod labels %s" % (kind, name, sel, tl))
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for t in o["spec"].get("volumeClaimTemplates", []):
            vols[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "claimTemplate": True}
        for v in vols.values():
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                fail("%s: volume %s claims %s, which no PVC defines" %
                     (name, v["name"], v["persistentVolumeClaim"]["claimName"]))
            if "configMap" in v and not find(objs, "ConfigMap", v["configMap"]["name"]):
                fail("%s: volume %s names ConfigMap %s, which does not exist" %
                     (name, v["name"], v["configMap"]["name"]))
            if "secret" in v:
                s = v["secret"]
                if s.get("secretName") != "twn-curve":
                    fail("%s: secret volume of unknown Secret %s" % (name, s.get("secretName")))
                if s.get("defaultMode") not in (0o400, 0o600):
                    fail("%s: secret volume %s defaultMode %s, expected 0400 or 0600" %
                         (name, v["name"], oct(s.get("defaultMode") or 0)))
                for it in s.get("items", []):
                    if it["key"] not in secret_keys:
                        fail("%s: secret item %s is not a key of Secret twn-curve (%s)" %
                             (name, it["key"], sorted(secret_keys)))
        copied = set()  # file names the init container copies into the keys volume
        for v in vols.values():
            if "secret" in v:
                copied |= {it["path"] for it in v["secret"].get("items", [])}
        cm_text, cm = configmap_twn_yaml(objs)
        for c in spec.get("initContainers", []) + spec["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols:
                    fail("%s container %s mounts volume %s, which the pod does not define" %
                         (name, c["name"], m["name"]))
            if c.get("image") != "twn":
                fail("%s container %s: image %r, expected 'twn' (kustomization.yaml sets the "
                     "registry and tag)" % (name, c["name"], c.get("image")))
        for c in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if "metrics" not in ports:
                fail("%s container %s has no port named metrics" % (name, c["name"]))
            elif cm and str(ports["metrics"]) != str(cm["metrics"]["listen"]).rsplit(":", 1)[1]:
                fail("%s: metrics containerPort %s but the ConfigMap's metrics.listen is %s" %
                     (name, ports["metrics"], cm["metrics"]["listen"]))
            for probe in ("readinessProbe", "livenessProbe"):
                p = (c.get(probe) or {}).get("httpGet")
                if not p or p.get("port") not in ports:
                    fail("%s container %s: %s must httpGet a named port of the container" %
                         (name, c["name"], probe))
            # Every key file a pod names exists in its keys volume.
            files = {}
            for e in c.get("env", []):
                if e["name"].startswith("TWN_SECURITY_") and e["name"].endswith("_FILE"):
                    files[e["name"]] = e["value"]
            if cm:
                for k in ("server_public_key_file", "allowed_clients_file"):
                    files["security." + k] = cm["security"][k]
            for k, path in files.items():
                if os.path.basename(path) not in copied:
                    fail("%s: %s = %s, but the pod's secret volume provides only %s" %
                         (name, k, path, sorted(copied)))
    ok("%d workloads: selectors, volumes, claims, Secret items, images, named ports and key "
       "files agree" % len(workloads))

    # Services select a workload whose pods have every targetPort name.
    for _, svc in objs:
        if svc["kind"] != "Service":
            continue
        sel = svc["spec"].get("selector", {})
        hits = [(n, s) for n, k, s, _ in workloads
                if labels_match(sel, find(objs, k, n)["spec"]["template"]["metadata"]["labels"])]
        if not hits:
            fail("Service %s selects no workload (%s)" % (svc["metadata"]["name"], sel))
            continue
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for n, s in hits:
                names = {q["name"] for c in s["containers"] for q in c.get("ports", [])}
                if isinstance(tp, str) and tp not in names:
                    fail("Service %s port %s targets %s, which %s's containers do not name" %
                         (svc["metadata"]["name"], p["name"], tp, n))
    # The ServiceMonitor reaches every workload through a Service with a port named metrics.
    sm = find(objs, "ServiceMonitor", "twn")
    if sm:
        sel = sm["spec"]["selector"]["matchLabels"]
        ports = {e["port"] for e in sm["spec"]["endpoints"]}
        if ports != {"metrics"}:
            fail("ServiceMonitor twn scrapes ports %s, expected metrics" % sorted(ports))
        scraped = set()
        for _, svc in objs:
            if (svc["kind"] == "Service" and labels_match(sel, svc["metadata"].get("labels", {}))
                    and any(p["name"] == "metrics" for p in svc["spec"]["ports"])):
                for n, k, s, _ in workloads:
                    if labels_match(svc["spec"]["selector"],
                                    find(objs, k, n)["spec"]["template"]["metadata"]["labels"]):
                        scraped.add(n)
        missing = {n for n, _, _, _ in workloads} - scraped
        if missing:
            fail("the ServiceMonitor scrapes no Service of %s" % sorted(missing))
    ok("Services reach their workloads' named ports; the ServiceMonitor covers every workload")

    # The NetworkPolicy admits every port a twn container listens on, and nothing else.
    np = find(objs, "NetworkPolicy", "twn")
    if np:
        allowed = {p["port"] for r in np["spec"].get("ingress", []) for p in r.get("ports", [])}
        listening = set()
        for name, kind, spec, _ in workloads:
            labels = find(objs, kind, name)["spec"]["template"]["metadata"]["labels"]
            if not labels_match(np["spec"]["podSelector"].get("matchLabels"), labels):
                fail("NetworkPolicy twn does not select the pods of %s" % name)
            listening |= {p["containerPort"] for c in spec["containers"]
                          for p in c.get("ports", [])}
        if allowed != listening:
            fail("NetworkPolicy twn admits ports %s; the containers listen on %s" %
                 (sorted(allowed), sorted(listening)))
        ok("the NetworkPolicy selects every twn pod and admits exactly their ports %s" %
           sorted(listening))


def check_shards(objs):
    _, cm = configmap_twn_yaml(objs)
    sts = find(objs, "StatefulSet", "twn-indexer")
    if not cm or not sts:
        fail("no ConfigMap twn-config with twn.yaml, or no StatefulSet twn-indexer")
        return
    shards = cm["job"]["shards"]
    replicas = sts["spec"]["replicas"]
    eps = cm["indexer"]["endpoints"]
    if not (shards == replicas == len(eps)):
        fail("job.shards = %s, StatefulSet twn-indexer replicas = %s and indexer.endpoints has %d "
             "entries: they must agree" % (shards, replicas, len(eps)))
    svc = sts["spec"]["serviceName"]
    port = [p["containerPort"] for c in sts["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", []) if p["name"] == "data"]
    for i, ep in enumerate(eps):
        want = "tcp://%s-%d.%s:%s" % (sts["metadata"]["name"], i, svc, port[0] if port else "?")
        if ep != want:
            fail("indexer.endpoints[%d] = %s, expected %s (pod %d of the StatefulSet)" %
                 (i, ep, want, i))
    for c in sts["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] == "TWN_INDEXER_LISTEN":
                if e["value"] != "tcp://0.0.0.0:%s" % port[0]:
                    fail("the indexer's TWN_INDEXER_LISTEN %s: expected tcp://0.0.0.0:%s"
                         % (e["value"], port[0]))
    coord = find(objs, "Service", "twn-coordinator")
    cport = [p["port"] for p in coord["spec"]["ports"] if p["name"] == "control"] if coord else []
    want = "tcp://twn-coordinator:%s" % (cport[0] if cport else "?")
    if cm["coordinator"]["connect"] != want:
        fail("coordinator.connect = %s, expected %s (the Service)" %
             (cm["coordinator"]["connect"], want))
    if not str(cm["coordinator"]["listen"]).endswith(":%s" % (cport[0] if cport else "?")):
        fail("coordinator.listen = %s does not bind the Service's control port %s" %
             (cm["coordinator"]["listen"], cport))
    ok("job.shards = replicas = %d endpoints, one DNS name per pod; coordinator.connect is the "
       "Service" % shards)


def check_curve_secret(src, twn, objs):
    script = os.path.join(src, "deploy", "k8s", "curve-secret.sh")
    env = dict(os.environ, TWN=twn)
    r = subprocess.run(["/bin/sh", script], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail("curve-secret.sh exited %d: %s" % (r.returncode, r.stderr.strip()))
        return
    s = yaml.safe_load(r.stdout)
    tmpl = find(objs, "Secret", "twn-curve")
    want = set(tmpl.get("stringData", {})) if tmpl else set()
    if s.get("kind") != "Secret" or s["metadata"]["name"] != "twn-curve":
        fail("curve-secret.sh printed %s %s, expected Secret twn-curve" %
             (s.get("kind"), s.get("metadata", {}).get("name")))
        return
    if set(s["data"]) != want:
        fail("curve-secret.sh keys %s differ from secret-curve.yaml's %s" %
             (sorted(s["data"]), sorted(want)))
    z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
    keys = {}
    for k, v in s["data"].items():
        text = base64.b64decode(v).decode()
        lines = [l for l in text.splitlines() if l and not l.startswith("#")]
        keys[k] = lines
        if k != "allowed_clients" and (len(lines) != 1 or not z85.match(lines[0])):
            fail("curve-secret.sh: %s does not hold one Z85 key (%d lines)" % (k, len(lines)))
    allowed = set(keys.get("allowed_clients", []))
    if allowed != {keys["gate.pub"][0], keys["worker.pub"][0]}:
        fail("curve-secret.sh: allowed_clients is not {gate.pub, worker.pub}")
    if len({keys[k][0] for k in ("server.pub", "gate.pub", "worker.pub")}) != 3:
        fail("curve-secret.sh: the three keypairs are not distinct")
    ok("curve-secret.sh makes Secret twn-curve with 3 fresh keypairs and the allow-list")


def check_kustomization(src, docs):
    k = docs.get(os.path.join("k8s", "kustomization.yaml"))
    if not k:
        fail("deploy/k8s/kustomization.yaml is missing")
        return
    for r in k[0].get("resources", []):
        if not os.path.exists(os.path.join(src, "deploy", "k8s", r)):
            fail("kustomization.yaml lists %s, which does not exist" % r)
    if "secret-curve.yaml" in k[0].get("resources", []):
        fail("kustomization.yaml must not apply secret-curve.yaml (placeholders over real keys)")
    ok("kustomization.yaml's resources exist; the placeholder Secret is not among them")


# ------------------------------------------------------------------------------------------------
# Part: config


def twn_env(extra):
    """The environment for a twn run: this one without TWN_* (they would override the file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWN_")}
    env.update(extra)
    return env


def config_check(twn, path, flags, env, what):
    r = subprocess.run([twn, "config", "--check", path] + flags, env=twn_env(env),
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail("%s: twn config --check %s %s exited %d: %s" %
             (what, path, " ".join(flags), r.returncode, r.stderr.strip()))
        return None
    return r.stdout


def role_flags(args, shard):
    """The flags after `twn ROLE --config FILE` in a container's args or a shell command."""
    if len(args) == 1:  # sh -c "exec /usr/local/bin/twn indexer --config F --indexer.shard ..."
        args = shlex.split(args[0].replace("${HOSTNAME##*-}", str(shard)))
        args = args[args.index("exec") + 2:]
    out, i = [], 1
    while i < len(args):
        if args[i] == "--config":
            i += 2
            continue
        out.append(args[i])
        i += 1
    return args[0], out


def check_config(src, twn):
    r = subprocess.run([twn, "config", "--help"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or "--check" not in r.stdout + r.stderr:
        skip("`%s config --check` does not exist yet (exit %d: %s); the ConfigMap's twn.yaml "
             "cannot be checked" % (twn, r.returncode, (r.stdout + r.stderr).strip()[:200]))
    docs = load_yaml_files(os.path.join(src, "deploy"))
    objs = k8s_objects(docs)
    text, cm = configmap_twn_yaml(objs)
    if text is None:
        fail("no ConfigMap twn-config with a twn.yaml")
        finish()
    tmp = tempfile.mkdtemp(prefix="twn-deploy-")
    try:
        path = os.path.join(tmp, "twn.yaml")
        with open(path, "w") as f:
            f.write(text)
        out = config_check(twn, path, [], {}, "ConfigMap twn.yaml")
        if out is not None:
            ok("the ConfigMap's twn.yaml passes twn config --check")
        # Each pod: its TWN_* environment and its flags, as the role would load them.
        n = 0
        for name, kind, spec, replicas in pod_specs(objs):
            for c in spec["containers"]:
                env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                role, flags = role_flags(c["args"], replicas - 1)
                if role not in ("coordinator", "gate", "worker", "indexer"):
                    fail("%s runs `twn %s`, not a role command" % (name, role))
                out = config_check(twn, path, flags, env, "%s (twn %s)" % (name, role))
                if out is None:
                    continue
                n += 1
                for k, v in env.items():
                    if k.startswith("TWN_") and "from env %s" % k not in out:
                        fail("%s: %s is not a config key (twn config --check does not show it "
                             "as an origin)" % (name, k))
        ok("%d pods' config (file + their TWN_* env + flags) passes twn config --check" % n)
        # Not a no-op: a broken value is refused, naming the key.
        bad = os.path.join(tmp, "bad.yaml")
        with open(bad, "w") as f:
            f.write(re.sub(r"(?m)^(  shards:) \d+", r"\1 zero", text))
        r = subprocess.run([twn, "config", "--check", bad], env=twn_env({}),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 2 or "job.shards" not in r.stderr:
            fail("twn config --check accepted job.shards: zero (exit %d: %s)" %
                 (r.returncode, r.stderr.strip()))
        else:
            ok("a broken job.shards is refused: %s" % r.stderr.strip())
        check_systemd_config(src, twn, tmp)
    finally:
        shutil.rmtree(tmp)


def unit_exec(path):
    """(Environment assignments, ExecStart argv) of a unit file."""
    env, argv = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Environment="):
                for a in shlex.split(line[len("Environment="):]):
                    k, _, v = a.partition("=")
                    env[k] = v
            elif line.startswith("ExecStart="):
                argv = shlex.split(line[len("ExecStart="):])
    return env, argv


def check_systemd_config(src, twn, tmp):
    sd = os.path.join(src, "deploy", "systemd")
    conf = os.path.join(sd, "twn.yaml")
    if config_check(twn, conf, [], {}, "deploy/systemd/twn.yaml") is None:
        return
    n = 0
    for u in sorted(os.listdir(sd)):
        if not u.endswith(".service"):
            continue
        env, argv = unit_exec(os.path.join(sd, u))
        inst = "1"
        env = {k: v.replace("%i", inst) for k, v in env.items() if k.startswith("TWN_")}
        argv = [a.replace("%i", inst).replace("%d", tmp) for a in argv]
        if argv[0] != "/usr/local/bin/twn" or "--config" not in argv:
            fail("%s: ExecStart %s is not /usr/local/bin/twn ROLE --config FILE" % (u, argv))
            continue
        _, flags = role_flags(argv[1:], 0)
        if config_check(twn, conf, flags, env, "%s (instance %s)" % (u, inst)) is not None:
            n += 1
    ok("deploy/systemd/twn.yaml passes twn config --check with the flags and environment of "
       "%d units" % n)


# ------------------------------------------------------------------------------------------------
# Part: metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text, seen):
    """Adds to seen: {sample name: {label name: set of values}}."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            fail("unparsable /metrics line: %r" % line)
            continue
        labels = seen.setdefault(m.group(1), {})
        for k, v in LABEL.findall(m.group(3) or ""):
            labels.setdefault(k, set()).add(v)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def scrape_twn_run(twn, tmp, n_items):
    """Runs `twn run --engine null` with /metrics on a free port, scraping it until it exits
    (metrics.linger_ms keeps the server up after the job, so the last scrapes see the final
    numbers however fast the job was).  Returns (seen, scrapes, process result)."""
    inp = os.path.join(tmp, "items.jsonl")
    with open(inp, "w") as f:
        for i in range(n_items):
            f.write(json.dumps({"id": "item-%06d" % i, "text": "text number %d" % i}) + "\n")
        f.write("{not json\n")  # one dead letter
    port = free_port()
    cmd = [twn, "run", "--engine", "null", "--input", inp, "--out", os.path.join(tmp, "out"),
           "--shards", "2", "--gates", "2", "--workers", "2", "--metrics.listen",
           "127.0.0.1:%d" % port, "--metrics.linger_ms", "1500", "--log.progress", "off"]
    p = subprocess.Popen(cmd, env=twn_env({"OPENBLAS_NUM_THREADS": "1"}), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen, scrapes, last = {}, 0, ""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
                last = r.read().decode()
                parse_exposition(last, seen)
                scrapes += 1
        except OSError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.05)
    else:
        p.kill()
    out, err = p.communicate()
    return seen, scrapes, (p.returncode, out, err, " ".join(cmd))


def promql_metrics(expr):
    """[(metric name, {label: (op, value)})] of the selectors in a PromQL expression."""
    out = []
    for m in re.finditer(r'\b(twn_[a-zA-Z0-9_]*)\s*(\{([^}]*)\})?', expr):
        matchers = {}
        for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"',
                              m.group(3) or ""):
            matchers[lm.group(1)] = (lm.group(2), lm.group(3))
        out.append((m.group(1), matchers))
    return out


def promql_grouping(expr):
    """Label names in by (...) / without (...) clauses."""
    out = set()
    for m in re.finditer(r'\b(?:by|without)\s*\(([^)]*)\)', expr):
        out |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return out


def documented_metrics(src):
    """Metric names listed in common/metrics.h's header comment."""
    with open(os.path.join(src, "common", "metrics.h")) as f:
        text = f.read()
    head = text[:text.find("#ifndef")]
    return sorted(set(re.findall(r'^\s*\*\s+(twn_[a-z0-9_]+)', head, re.M)))


def check_metrics(src, twn):
    path = os.path.join(src, "deploy", "grafana", "twn.json")
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        fail("%s does not parse as JSON: %s" % (path, e))
        finish()
    exprs = dashboard_exprs(src)
    if not exprs:
        fail("the dashboard has no PromQL targets")
        finish()
    for key in ("title", "uid", "panels", "templating"):
        if key not in dash:
            fail("%s has no %s" % (path, key))
    ok("%s parses: %d panels, %d PromQL expressions" % (path, len(dash["panels"]), len(exprs)))

    tmp = tempfile.mkdtemp(prefix="twn-metrics-")
    try:
        seen, scrapes, (rc, out, err, cmd) = scrape_twn_run(twn, tmp, 20000)
    finally:
        shutil.rmtree(tmp)
    if rc != 0:
        fail("%s exited %s: %s" % (cmd, rc, err.strip()[-2000:]))
    if not scrapes:
        fail("no /metrics scrape answered while `%s` ran" % cmd)
        finish()
    ok("%d /metrics scrapes of twn run --engine null: %d sample names" % (scrapes, len(seen)))

    families = {n for n in seen}
    for title, expr in exprs:
        metrics = promql_metrics(expr)
        if not metrics:
            fail("panel %r: %s queries no twn_ metric" % (title, expr))
        for name, matchers in metrics:
            if name not in seen:
                fail("panel %r: %s is not in any /metrics scrape (%s)" % (title, name, expr))
                continue
            for lab, (op, val) in matchers.items():
                if lab not in seen[name]:
                    fail("panel %r: %s has no label %s (it has %s)" %
                         (title, name, lab, sorted(seen[name])))
                elif op == "=" and val not in seen[name][lab]:
                    fail("panel %r: %s{%s=%r}: that value never appeared (seen %s)" %
                         (title, name, lab, val, sorted(seen[name][lab])))
                elif op == "=~" and re.fullmatch(r"[a-zA-Z0-9_|]+", val):
                    for alt in val.split("|"):
                        if alt not in seen[name][lab]:
                            fail("panel %r: %s{%s=~%r}: %r never appeared" %
                                 (title, name, lab, val, alt))
        labels_here = set()
        for name, _ in metrics:
            labels_here |= set(seen.get(name, {}))
        for g in promql_grouping(expr):
            if g not in labels_here:
                fail("panel %r: grouping by %s, a label none of %s has" %
                     (title, g, sorted({n for n, _ in metrics})))
    ok("every metric, label and matched value the dashboard queries is in the scrapes")

    used = {n for _, e in exprs for n, _ in promql_metrics(e)}
    documented = documented_metrics(src)
    for d in documented:
        if not any(u == d or u.startswith(d + "_") for u in used):
            fail("%s is documented in common/metrics.h but no dashboard panel shows it" % d)
        if not any(f == d or f in (d + "_bucket", d + "_count", d + "_sum") for f in families):
            fail("%s is documented in common/metrics.h but no scrape of twn run has it" % d)
    ok("all %d metrics documented in common/metrics.h are on the dashboard" % len(documented))


# ------------------------------------------------------------------------------------------------
# Part: promql


def http_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def dashboard_exprs(src):
    with open(os.path.join(src, "deploy", "grafana", "twn.json")) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    return out


def check_promql(src, twn):
    prom = shutil.which("prometheus")
    if not prom:
        skip("prometheus (Debian package prometheus) is not installed: the dashboard's queries "
             "cannot be evaluated")
    exprs = dashboard_exprs(src)
    tmp = tempfile.mkdtemp(prefix="twn-promql-")
    pp = tp = None
    try:
        twn_port, prom_port = free_port(), free_port()
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            yaml.safe_dump({"global": {"scrape_interval": "250ms", "evaluation_interval": "1s"},
                            "scrape_configs": [{"job_name": "twn", "static_configs": [
                                {"targets": ["127.0.0.1:%d" % twn_port]}]}]}, f)
        pp = subprocess.Popen([prom, "--config.file=" + os.path.join(tmp, "prometheus.yml"),
                               "--storage.tsdb.path=" + os.path.join(tmp, "data"),
                               "--web.listen-address=127.0.0.1:%d" % prom_port],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "p.log"), "w"))
        api = "http://127.0.0.1:%d" % prom_port
        for _ in range(300):
            try:
                urllib.request.urlopen(api + "/-/ready", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            with open(os.path.join(tmp, "p.log")) as f:
                fail("prometheus did not become ready: %s" % f.read()[-1500:])
            finish()
        # Prometheus applies discovered targets every 5 s: wait until it tries the twn target
        # (down until twn starts) so that the job's first seconds are scraped too.
        for _ in range(200):
            t = http_json(api + "/api/v1/targets")["data"]["activeTargets"]
            if t and t[0].get("health") in ("up", "down"):
                break
            time.sleep(0.1)
        else:
            fail("prometheus never tried to scrape 127.0.0.1:%d" % twn_port)
            finish()
        # A job of a few seconds (many scrapes at 4 a second), /metrics kept up 3 s after it.
        inp = os.path.join(tmp, "items.jsonl")
        with open(inp, "w") as f:
            for i in range(150000):
                f.write('{"id":"i%d","text":"item %d"}\n' % (i, i))
            f.write("{broken\n")
        t0 = time.time()
        tp = subprocess.Popen([twn, "run", "--engine", "null", "--input", inp, "--out",
                               os.path.join(tmp, "out"), "--shards", "2", "--gates", "2",
                               "--workers", "2", "--metrics.listen", "127.0.0.1:%d" % twn_port,
                               "--metrics.linger_ms", "3000", "--log.progress", "off"],
                              env=twn_env({"OPENBLAS_NUM_THREADS": "1"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = tp.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            tp.kill()
            out, err = tp.communicate()
            fail("twn run did not end within 240 s (a hang; its stderr: %s)" % err.strip()[-800:])
            finish()
        if tp.returncode != 0:
            fail("twn run exited %d: %s" % (tp.returncode, err.strip()[-1500:]))
            finish()
        t1 = time.time()
        time.sleep(0.5)  # the last scrape lands
        ok("prometheus scraped twn run (%s) for %.1f s" % (out.strip(), t1 - t0))
        rng = {"start": "%.3f" % t0, "end": "%.3f" % time.time(), "step": "0.25"}
        for title, expr in exprs:
            q = expr.replace("$__rate_interval", "2s")
            try:
                r = http_json(api + "/api/v1/query_range?" +
                              urllib.parse.urlencode(dict(rng, query=q)))
            except urllib.error.HTTPError as e:
                fail("panel %r: prometheus refused %s: %s" % (title, q, e.read().decode()[:300]))
                continue
            series = r["data"]["result"]
            vals = [float(v[1]) for s_ in series for v in s_["values"]]
            finite = [v for v in vals if v == v and v not in (float("inf"), float("-inf"))]
            if not finite:
                fail("panel %r: %s returns %s" % (title, q, "no series" if not series else
                                                   "only NaN/Inf (%d points)" % len(vals)))
        ok("every one of the %d dashboard queries returns data from prometheus (range query over "
           "the run, $__rate_interval = 2s at 4 scrapes/s)" % len(exprs))
    finally:
        for p in (tp, pp):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------------------
# Part: fleet


def secret_files(twn):
    """{key: bytes} of a fresh twn-curve Secret made by curve-secret.sh."""
    script = os.path.join(SRC, "deploy", "k8s", "curve-secret.sh")
    r = subprocess.run(["/bin/sh", script], env=dict(os.environ, TWN=twn), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        fail("curve-secret.sh exited %d: %s" % (r.returncode, r.stderr.strip()))
        finish()
    return {k: base64.b64decode(v) for k, v in yaml.safe_load(r.stdout)["data"].items()}


def put_key(path, data):
    """A key file as the pods' init containers and systemd's LoadCredential= leave it: 0400."""
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o400)


def loopback_conf(conf, inp, ports, bind_names):
    """The fleet config with loopback addresses (host names where the fleet uses names), a local
    input, the null engine and metrics on free ports; the rest as written."""
    conf = json.loads(json.dumps(conf))
    conf["coordinator"]["listen"] = "tcp://127.0.0.1:%d" % ports[0]
    conf["coordinator"]["connect"] = "tcp://localhost:%d" % ports[0]
    conf["coordinator"]["connect_timeout_ms"] = 60000
    conf["indexer"]["endpoints"] = ["tcp://%s:%d" % ("localhost" if bind_names else "127.0.0.1",
                                                     p) for p in ports[1:]]
    conf["job"]["inputs"] = [inp]
    conf["job"]["engine"] = "null"
    conf["job"]["unit_items"] = 100
    conf["metrics"] = {"listen": "127.0.0.1:0", "linger_ms": 0}
    conf["log"]["progress"] = "off"
    return conf


class Fleet:
    """Processes of one job; the coordinator first.  Each: (name, Popen, log path)."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []

    def start(self, name, argv, env, cwd):
        log = os.path.join(self.tmp, name + ".log")
        with open(log, "w") as lf:
            p = subprocess.Popen(argv, env=twn_env(dict(env, OPENBLAS_NUM_THREADS="1")),
                                 stdout=subprocess.PIPE, stderr=lf, text=True, cwd=cwd)
        self.procs.append((name, p, log))

    def log(self, name):
        with open(os.path.join(self.tmp, name + ".log")) as f:
            return f.read()

    def wait_one(self, timeout):
        """Waits for the last started process; returns (exit status, its log)."""
        name, p, _ = self.procs.pop()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
        return p.returncode, self.log(name)

    def finish(self, what, n_items):
        """Every role ends on the coordinator's Shutdown; once the coordinator has exited the
        others get 30 s.  Checks the exits and the coordinator's summary line."""
        coord = self.procs[0][1]
        deadline = time.time() + 240
        while time.time() < deadline and any(p.poll() is None for _, p, _ in self.procs):
            if coord.poll() is not None:
                deadline = min(deadline, time.time() + 30)
            time.sleep(0.1)
        summary = ""
        for name, p, _ in self.procs:
            if p.poll() is None:
                fail("%s: %s still running %s" % (what, name, "30 s after the coordinator exited"
                                                  if coord.poll() is not None else "after 240 s"))
                p.kill()
                p.wait()
            out = p.stdout.read()
            p.stdout.close()
            if p is coord:
                summary = out.strip()
            if p.returncode != 0:
                fail("%s: %s exited %s: %s" % (what, name, p.returncode,
                                               self.log(name).strip()[-1500:]))
        m = re.search(r"items (\d+) easy (\d+) hard (\d+) rejected (\d+)", summary)
        if not m or int(m.group(1)) != n_items + 1 or int(m.group(4)) != 1:
            fail("%s: coordinator summary %r: expected items %d with rejected 1" %
                 (what, summary, n_items + 1))
        ok("%s: %d processes finished the job: %s" % (what, len(self.procs), summary))

    def kill(self):
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def fleet_k8s(twn, objs, tmp, inp, n_items):
    """The k8s workloads: each pod's args, TWN_* env and key files (copied from a fresh
    curve-secret.sh Secret with mode 0400, as the init containers do) against the ConfigMap's
    twn.yaml with loopback addresses.  Changed from the manifests, and only these: addresses,
    job.inputs, job.engine (null), each pod's own job.out, job.backend (cpu) and HOSTNAME."""
    text, cm = configmap_twn_yaml(objs)
    shards = cm["job"]["shards"]
    ports = [free_port() for _ in range(shards + 1)]
    cpath = os.path.join(tmp, "k8s-twn.yaml")
    with open(cpath, "w") as f:
        yaml.safe_dump(loopback_conf(cm, inp, ports, True), f)
    secret = secret_files(twn)
    fleet = Fleet(tmp)

    def start(name, spec, ordinal, keyset, extra_env=None):
        pod = "%s-%d" % (name, ordinal)
        root = os.path.join(tmp, pod)
        keys = os.path.join(root, "keys")
        os.makedirs(keys)
        for v in spec["volumes"]:
            for it in (v.get("secret") or {}).get("items", []):
                put_key(os.path.join(keys, it["path"]), keyset[it["key"]])
        c = spec["containers"][0]
        env = {e["name"]: e["value"].replace("/run/twn/keys", keys)
               for e in c.get("env", []) if "value" in e}
        if "TWN_INDEXER_LISTEN" in env:  # k8s: one port on every pod IP; here: a port each
            env["TWN_INDEXER_ENDPOINTS"] = ",".join("tcp://127.0.0.1:%d" % p for p in ports[1:])
            env["TWN_INDEXER_LISTEN"] = "tcp://127.0.0.1:%d" % ports[1 + ordinal]
        # the ConfigMap's key paths, pointed at this pod's keys volume
        env["TWN_SECURITY_SERVER_PUBLIC_KEY_FILE"] = os.path.join(keys, "server.pub")
        env["TWN_SECURITY_ALLOWED_CLIENTS_FILE"] = os.path.join(keys, "allowed_clients")
        env.update(TWN_JOB_OUT=os.path.join(root, "state"), TWN_JOB_BACKEND="cpu", HOSTNAME=pod)
        env.update(extra_env or {})
        argv = [x.replace("/usr/local/bin/twn", twn).replace("/etc/twn/twn.yaml", cpath)
                for x in c.get("command", []) + c.get("args", [])]
        if not c.get("command"):
            argv = [twn] + argv
        fleet.start(pod, argv, env, root)

    try:
        workloads = {w[0]: w for w in pod_specs(objs)}
        start("twn-coordinator", workloads["twn-coordinator"][2], 0, secret)
        # CURVE is really on: a gate whose client key is not on the allow-list is refused.
        intruder = dict(secret)
        other = secret_files(twn)
        intruder["gate.key"], intruder["gate.pub"] = other["gate.key"], other["gate.pub"]
        start("intruder", workloads["twn-gate"][2], 0, intruder,
              {"TWN_COORDINATOR_CONNECT_TIMEOUT_MS": "3000"})
        rc, ilog = fleet.wait_one(30)
        if rc != 1 or not ("refused this process's key" in ilog or "no Welcome" in ilog):
            fail("k8s: a gate with a key not on the allow-list: exit %s, %s" %
                 (rc, ilog.strip()[-500:]))
        elif "is not on the allow-list" not in fleet.log("twn-coordinator-0"):
            fail("k8s: the coordinator did not log refusing a key not on the allow-list")
        else:
            ok("k8s: CURVE is on, a key not on the allow-list is refused: %s" %
               ilog.strip().splitlines()[-1])
        for name, (_, kind, spec, replicas) in workloads.items():
            if name != "twn-coordinator":
                for i in range(min(replicas, shards if kind == "StatefulSet" else 2)):
                    start(name, spec, i, secret)
        fleet.finish("k8s pods (their args, env and key files; CURVE on; loopback tcp)", n_items)
    finally:
        fleet.kill()


def fleet_systemd(twn, src, tmp, inp, n_items):
    """The systemd units: each unit's ExecStart and Environment= against deploy/systemd/twn.yaml
    with loopback addresses; /etc/twn/keys is a directory of keys from twn keygen, %d a
    credentials directory holding the LoadCredential= files with mode 0400.  Changed from the
    units: addresses, job.inputs, job.engine (null), each unit's job.out, TWN_JOB_BACKEND (cpu),
    TWN_METRICS_LISTEN (a free loopback port instead of 0.0.0.0:19xN)."""
    sd = os.path.join(src, "deploy", "systemd")
    with open(os.path.join(sd, "twn.yaml")) as f:
        conf = yaml.safe_load(f)
    shards = conf["job"]["shards"]
    ports = [free_port() for _ in range(shards + 1)]
    etc = os.path.join(tmp, "etc-twn")
    keys = os.path.join(etc, "keys")
    os.makedirs(keys)
    secret = secret_files(twn)
    for k, v in secret.items():
        put_key(os.path.join(keys, k), v)
    c = loopback_conf(conf, inp, ports, False)
    for k in ("server_public_key_file", "allowed_clients_file"):
        c["security"][k] = c["security"][k].replace("/etc/twn/keys", keys)
    cpath = os.path.join(etc, "twn.yaml")
    with open(cpath, "w") as f:
        yaml.safe_dump(c, f)
    fleet = Fleet(tmp)

    def start(unit, inst):
        name = unit.replace("@.service", "@%s.service" % inst)
        env, argv = unit_exec(os.path.join(sd, unit))
        root = os.path.join(tmp, name)
        creds = os.path.join(root, "credentials")
        os.makedirs(creds)
        with open(os.path.join(sd, unit)) as f:
            for m in re.finditer(r"(?m)^LoadCredential=([^:\n]+):(\S+)$", f.read()):
                put_key(os.path.join(creds, m.group(1)),
                        secret[os.path.basename(m.group(2))])
        sub = lambda x: (x.replace("%i", inst).replace("%d", creds).replace("/etc/twn/keys", keys)
                         .replace("/etc/twn/twn.yaml", cpath).replace("/usr/local/bin/twn", twn))
        env = {k: sub(v) for k, v in env.items() if k.startswith("TWN_")}
        env.update(TWN_JOB_OUT=os.path.join(root, "state"), TWN_JOB_BACKEND="cpu",
                   TWN_METRICS_LISTEN="127.0.0.1:0")
        fleet.start(name, [sub(a) for a in argv], env, root)

    try:
        start("twn-coordinator.service", "")
        for i in range(shards):
            start("twn-indexer@.service", str(i))
        start("twn-gate@.service", "0")
        start("twn-worker@.service", "1")
        fleet.finish("systemd units (their ExecStart, Environment= and credentials; CURVE on; "
                     "loopback tcp)", n_items)
    finally:
        fleet.kill()


def check_fleet(src, twn):
    objs = k8s_objects(load_yaml_files(os.path.join(src, "deploy")))
    if configmap_twn_yaml(objs)[0] is None:
        fail("no ConfigMap twn-config with a twn.yaml")
        finish()
    tmp = tempfile.mkdtemp(prefix="twn-fleet-")
    try:
        n_items = 3000
        inp = os.path.join(tmp, "items.jsonl")
        with open(inp, "w") as f:
            for i in range(n_items):
                f.write(json.dumps({"id": "doc-%05d" % i, "text": "item %d" % i}) + "\n")
            f.write("{broken\n")  # one dead letter
        fleet_k8s(twn, objs, tmp, inp, n_items)
        fleet_systemd(twn, src, tmp, inp, n_items)
    finally:
        shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------------------
# Part: readme


def message_fragments(msg):
    """The literal pieces of a printed message: what is left between the values (quoted strings,
    paths, numbers, key=value, "..."), the prefixes ("twn gate: ") and strerror texts."""
    errnos = {os.strerror(e) for e in range(1, 134)}
    errnos.add("expected near")  # jansson's parse error text, quoted in a dead letter's reason
    msg = re.sub(r"^twn [a-z]+: ", "", msg)  # the command prefix, "twn %s" at run time
    parts = re.split(r'"[^"]*"|\'[^\']*\'|\S*[./\d=]\S*|\.\.\.|\([^)]*\)|: |; ', msg)
    parts = [p.strip(" :;,.()") for p in parts]
    return [p for p in parts if len(p) >= 8 and p not in errnos]


def check_readme(src, twn):
    with open(os.path.join(src, "deploy", "README.md")) as f:
        text = f.read()
    if "## Error messages" not in text:
        fail("deploy/README.md has no '## Error messages' section")
        finish()
    code = ""
    for d in ("util", "engine", "common", "index", "coordinator", "gate_service", "worker", "cli"):
        for f in sorted(os.listdir(os.path.join(src, d))):
            if f.endswith(".c"):
                with open(os.path.join(src, d, f)) as fh:
                    code += fh.read()
    code = re.sub(r'"\s*\n\s*"', "", code)  # "a" "b" string literal continuations
    n = 0
    for line in text[text.index("## Error messages"):].splitlines():
        m = re.match(r"\| (dead letter )?`([^`]*)`", line)
        if not m:
            continue
        msg = m.group(2)
        if m.group(1):
            msg = json.loads("{%s}" % msg)["reason"]
        frags = message_fragments(msg)
        missing = [f for f in frags if f not in code]
        if not frags:
            fail("README error table: no literal text to look for in %r" % msg)
        elif missing:
            fail("README error table: %r is not printed by the code (no %s in any .c file)" %
                 (msg, missing))
        n += 1
    if n < 10:
        fail("README error table has %d messages; expected at least 10" % n)
    ok("the %d messages of deploy/README.md's error table are the code's own texts" % n)


# ------------------------------------------------------------------------------------------------
# Part: systemd


def check_systemd(src, twn):
    sa = shutil.which("systemd-analyze")
    if not sa:
        skip("systemd-analyze is not installed; the units cannot be verified here")
    sd = os.path.join(src, "deploy", "systemd")
    units = sorted(f for f in os.listdir(sd) if f.endswith((".service", ".target")))
    roles = {"twn-coordinator.service", "twn-gate@.service", "twn-worker@.service",
             "twn-indexer@.service", "twn.target"}
    if not roles <= set(units):
        fail("deploy/systemd lacks %s" % sorted(roles - set(units)))
    tmp = tempfile.mkdtemp(prefix="twn-units-")
    try:
        names = []
        for u in units:
            dst = u.replace("@.service", "@0.service")
            with open(os.path.join(sd, u)) as f:
                text = f.read()
            for req in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                        "User=twn"):
                if u.endswith(".service") and req not in text:
                    fail("%s lacks %s" % (u, req))
            with open(os.path.join(tmp, dst), "w") as f:
                f.write(text.replace("/usr/local/bin/twn", os.path.abspath(twn)))
            names.append(dst)
        r = subprocess.run([sa, "verify"] + names, cwd=tmp, capture_output=True, text=True,
                           timeout=120)
        msg = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or msg:
            fail("systemd-analyze verify %s (exit %d):\n%s" % (" ".join(names), r.returncode, msg))
        else:
            ok("systemd-analyze verify: %s clean" % ", ".join(names))
    finally:
        shutil.rmtree(tmp)
    sysusers = os.path.join(sd, "twn.sysusers.conf")
    with open(sysusers) as f:
        if not re.search(r"(?m)^u\s+twn\s", f.read()):
            fail("twn.sysusers.conf does not create the user twn")
    su = shutil.which("systemd-sysusers")
    if su:
        r = subprocess.run([su, "--dry-run", sysusers], capture_output=True, text=True,
                           timeout=60)
        msg = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or re.search(r"(?i)invalid|failed|error", msg):
            fail("systemd-sysusers --dry-run twn.sysusers.conf (exit %d): %s" %
                 (r.returncode, msg))
        else:
            ok("systemd-sysusers --dry-run accepts twn.sysusers.conf")


# ------------------------------------------------------------------------------------------------
# Part: container

# setup.sh packages the image build does not need: compilers for the ASan build, the test tools.
TEST_ONLY = {"clang", "libclang-rt-14-dev", "git", "nodejs", "npm", "python3", "python3-pil",
             "python3-numpy", "python3-fonttools", "python3-yaml", "fonts-noto-color-emoji",
             "chromium", "prometheus"}
# In debian:12-slim already (essential, or needed by apt itself).
BASE = {"libc6", "libgcc-s1", "libstdc++6"}


def containerfile_stages(text):
    """[(stage name, [instructions])]; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.search(r"\bAS\s+(\S+)", line, re.I)
            stages.append((m.group(1) if m else "?", []))
        if stages:
            stages[-1][1].append(line)
    return stages


def apt_packages(instrs):
    pk = []
    for ins in instrs:
        for m in re.finditer(r"apt-get install ((?:[^&;]|&(?!&))*)", ins):
            pk += [w for w in m.group(1).split() if not w.startswith("-")]
    return pk


def setup_packages(src):
    with open(os.path.join(src, "scripts", "setup.sh")) as f:
        text = f.read()
    m = re.search(r"PKGS=\((.*?)\)", text, re.S)
    return set(m.group(1).split()) if m else set()


def check_container(src, twn):
    path = os.path.join(src, "deploy", "Containerfile")
    with open(path) as f:
        text = f.read()
    stages = containerfile_stages(text)
    names = [s for s, _ in stages]
    if names != ["build", "runtime"]:
        fail("Containerfile stages %s, expected build then runtime" % names)
        finish()
    n = 0
    for stage, instrs in stages:
        for ins in instrs:
            if not ins.upper().startswith("COPY ") or "--from=" in ins:
                continue
            for s in ins.split()[1:-1]:
                n += 1
                if not os.path.exists(os.path.join(src, s)):
                    fail("Containerfile (%s): COPY %s, which is not in the repository" % (stage, s))
    ok("the %d paths the Containerfile copies from the repository exist" % n)
    # The ignore file is an allow-list ("*" then "!path"): every COPY source must be allowed.
    with open(path + ".dockerignore") as f:
        rules = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    if rules[:1] != ["*"]:
        fail("Containerfile.dockerignore must start with '*' (an allow-list)")
    for stage, instrs in stages:
        for ins in instrs:
            if ins.upper().startswith("COPY ") and "--from=" not in ins:
                for src_ in ins.split()[1:-1]:
                    if src_.rstrip("/") not in allowed:
                        fail("Containerfile.dockerignore leaves out %s, which the Containerfile "
                             "copies" % src_)
    ok("Containerfile.dockerignore admits exactly what the Containerfile copies")

    build_pk = [p for p in apt_packages(stages[0][1]) if "${" not in p]
    setup = setup_packages(src)
    extra = sorted(set(build_pk) - setup)
    if extra:
        fail("the build stage installs %s, which scripts/setup.sh does not" % extra)
    missing = sorted(setup - TEST_ONLY - set(build_pk))
    if missing:
        fail("scripts/setup.sh installs %s, which the Containerfile's build stage does not "
             "(add them, or list them in TEST_ONLY here if only tests need them)" % missing)
    ok("build stage packages = scripts/setup.sh's PKGS minus the test-only ones (%d)" %
       len(build_pk))

    # The image builds twn with gcc, without sanitizers: a clang or ASan build links other
    # libraries (libomp, the sanitizer runtime), which say nothing about the image.
    comment = subprocess.run(["readelf", "-p", ".comment", twn], capture_output=True,
                             text=True).stdout
    syms = subprocess.run(["readelf", "-sW", twn], capture_output=True, text=True).stdout
    if "clang" in comment or re.search(r"\b__[at]san_init\b", syms):
        print("SKIP (runtime libraries): %s is a clang or sanitizer build; the image's is gcc "
              "Release, so its libraries are checked by the Release build's test" % twn)
        return
    runtime_pk = set(apt_packages(stages[1][1]))
    r = subprocess.run(["readelf", "-d", twn], capture_output=True, text=True)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)
    if not needed:
        fail("readelf -d %s lists no NEEDED libraries: %s" % (twn, r.stderr.strip()))
        finish()
    ldd = subprocess.run(["ldd", twn], capture_output=True, text=True).stdout
    where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    for m in re.finditer(r"^\s*(/\S*/(ld-linux[^/\s]*))\s", ldd, re.M):
        where.setdefault(m.group(2), m.group(1))  # the interpreter: "/lib64/ld-linux... (0x..)"
    for lib in needed:
        p = where.get(lib)
        if not p:
            fail("ldd %s does not resolve %s" % (twn, lib))
            continue
        d = subprocess.run(["dpkg", "-S", os.path.realpath(p)], capture_output=True, text=True)
        if d.returncode != 0:
            d = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        pkgs = {x.split(":")[0].strip() for x in d.stdout.split(":")[0].split(",")}
        if d.returncode != 0 or not pkgs:
            fail("%s (%s) belongs to no Debian package" % (lib, p))
        elif not pkgs & (runtime_pk | BASE):
            fail("%s needs %s from %s, which the runtime stage does not install" %
                 (os.path.basename(twn), lib, sorted(pkgs)))
    ok("all %d libraries twn needs come from runtime-stage packages (%s)" %
       (len(needed), ", ".join(needed)))
    # Only runtime libraries: nothing twn does not load (the CUDA packages, named with a build
    # argument, serve the dlopen()ed module, which this build may not have).
    unused = sorted(p for p in runtime_pk - {"ca-certificates"} - runtime_libs_owned(needed, where)
                    if "${" not in p)
    if unused:
        fail("the runtime stage installs %s, which twn does not need" % ", ".join(unused))
    else:
        ok("the runtime stage installs nothing else (besides ca-certificates and cuBLAS)")


def runtime_libs_owned(needed, where):
    owned = set()
    for lib in needed:
        p = where.get(lib)
        if not p:
            continue
        d = subprocess.run(["dpkg", "-S", os.path.realpath(p)], capture_output=True, text=True)
        owned |= {x.split(":")[0].strip() for x in d.stdout.split(":")[0].split(",")}
    return owned


# ------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["manifests", "config", "metrics", "promql", "fleet",
                                     "systemd", "container", "readme"])
    ap.add_argument("--source", required=True)
    ap.add_argument("--twn", required=True)
    a = ap.parse_args()
    if not os.access(a.twn, os.X_OK):
        fail("%s is not an executable twn binary" % a.twn)
        finish()
    global SRC
    SRC = os.path.abspath(a.source)
    a.twn = os.path.abspath(a.twn)
    {"manifests": check_manifests, "config": check_config, "metrics": check_metrics,
     "promql": check_promql, "fleet": check_fleet, "systemd": check_systemd,
     "readme": check_readme,
     "container": check_container}[a.part](SRC, a.twn)
    finish()


if __name__ == "__main__":
    main()
