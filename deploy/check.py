#!/usr/bin/env python3
"""Offline checks of Sluice's Kubernetes manifests, run by the test command.

1. Renders deploy/base and every overlay the way `kubectl kustomize` does,
   for the subset of kustomize these manifests use: `resources` (files and
   directories), strategic-merge `patches` (lists of named items merged by
   `name`), `images`, `namespace`, `labels`, and `configMapGenerator` with
   `disableNameSuffixHash`.
2. Validates every built-in object against the Kubernetes JSON schemas
   bundled by `kubernetes-validate` (strict: unknown fields are errors), and
   KEDA's ScaledObject and the PrometheusRule by their required structure.
3. Checks the manifests against the binaries: every container command is a
   Sluice binary whose `--help` names each flag and subcommand used; probe
   ports exist; each grace period covers the configured shutdown grace; the
   ingress HPA has the documented behaviour; the ScaledObject targets the
   worker Deployment through the scaler Service; every metric the alerts and
   the dashboard query is one the code records.

    python deploy/check.py --bin target/debug
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"
DEPLOY = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DEPLOY)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    """Strategic merge: maps merge, lists of maps with `name` merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            match = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def render(directory):
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    known = {"apiVersion", "kind", "resources", "patches", "images", "namespace", "labels", "configMapGenerator", "generatorOptions"}
    for key in k:
        if key not in known:
            fail(directory, f"kustomization field `{key}` is not supported by this renderer")
    objects = []
    for r in k.get("resources", []):
        path = os.path.normpath(os.path.join(directory, r))
        objects.extend(render(path) if os.path.isdir(path) else load_docs(path))
    for gen in k.get("configMapGenerator", []):
        if not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
            fail(directory, "configMapGenerator needs generatorOptions.disableNameSuffixHash for this renderer")
        data = {}
        for file in gen.get("files", []):
            with open(os.path.join(directory, file)) as f:
                data[os.path.basename(file)] = f.read()
        meta = {"name": gen["name"]}
        if gen.get("options", {}).get("labels"):
            meta["labels"] = dict(gen["options"]["labels"])
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for p in k.get("patches", []):
        for patch in load_docs(os.path.join(directory, p["path"])):
            key = (patch["kind"], patch["metadata"]["name"])
            idx = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == key]
            if len(idx) != 1:
                fail(directory, f"patch {p['path']} targets {key}, found {len(idx)} objects")
                continue
            objects[idx[0]] = merge(objects[idx[0]], patch)
    for img in k.get("images", []):
        for o in objects:
            for c in containers(o):
                name, _, _ = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', 'latest')}"
    for pairs in k.get("labels", []):
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(pairs.get("pairs", {}))
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objects


def pod_spec(o):
    spec = o.get("spec", {})
    if o["kind"] in ("Deployment", "StatefulSet", "Job"):
        return spec.get("template", {}).get("spec", {})
    return None


def containers(o):
    spec = pod_spec(o)
    return spec.get("containers", []) if spec else []


def help_of(binary, cache={}):
    if binary not in cache:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            fail(binary, f"--help exited {out.returncode}")
        cache[binary] = out.stdout + out.stderr
    return cache[binary]


def check_commands(where, objects, bindir):
    for o in objects:
        for c in containers(o):
            if not c["image"].split(":")[0].endswith("sluice"):
                continue
            command = c.get("command", [])
            if len(command) != 1 or not command[0].startswith("/usr/local/bin/sluice-"):
                fail(where, f"{o['metadata']['name']}/{c['name']}: command must be one Sluice binary, not {command}")
                continue
            binary = os.path.join(bindir, os.path.basename(command[0]))
            if not os.path.exists(binary):
                fail(where, f"{binary} does not exist (build the binaries first)")
                continue
            text = help_of(binary)
            for arg in c.get("args", []):
                if arg.startswith("--") and arg not in text:
                    fail(where, f"{o['metadata']['name']}: `{arg}` is not in `{os.path.basename(binary)} --help`")
                if re.fullmatch(r"[a-z][a-z-]+", arg) and not re.search(rf"(^|\s){re.escape(arg)}(\s|$)", text, re.M):
                    fail(where, f"{o['metadata']['name']}: subcommand `{arg}` is not in `{os.path.basename(binary)} --help`")


def check_dockerfile(bindir):
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    if text.count("FROM ") < 2:
        fail("Dockerfile", "must be multi-stage")
    for binary in ("sluice-ingress", "sluice-admin", "sluice-worker", "sluice-scaler", "sluice-mock-provider"):
        if f"/src/target/release/{binary}" not in text:
            fail("Dockerfile", f"does not copy {binary}")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    helptext = help_of(os.path.join(bindir, os.path.basename(entry[0])))
    for arg in cmd:
        if (arg.startswith("--") or re.fullmatch(r"[a-z]+", arg)) and arg not in helptext:
            fail("Dockerfile", f"CMD `{arg}` is not in {entry[0]} --help")


def sluice_config(objects):
    for o in objects:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "sluice-config":
            return tomllib.loads(o["data"]["sluice.toml"])
    return None


def check_structure(where, objects):
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    config = sluice_config(objects)
    if config is None:
        fail(where, "no sluice-config ConfigMap")
        return
    if config.get("nats", {}).get("replicas") != 3:
        fail(where, "Sluice's streams must use nats.replicas = 3")
    nats = by_kind.get("StatefulSet", {}).get("nats")
    if not nats or nats["spec"]["replicas"] != 3:
        fail(where, "the NATS StatefulSet must have three nodes")
    # Each component's ops port in its config is the container port its probes use.
    for name, section in (("sluice-ingress", "ingress"), ("sluice-worker", "worker")):
        d = by_kind.get("Deployment", {}).get(name)
        ops = config.get(section, {}).get("ops_listen")
        if not d:
            continue
        if ops is None:
            fail(where, f"{name}: {section}.ops_listen is not set (its /metrics and probes need it)")
            continue
        port = int(ops.rsplit(":", 1)[1])
        for c in containers(d):
            named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            probe = c.get("readinessProbe", {}).get("httpGet", {}).get("port")
            if named.get(probe, probe) != port:
                fail(where, f"{name}: readiness probe port {probe} is not {section}.ops_listen's {port}")
    # Every NetworkPolicy selects pods that exist, and lets in every port the
    # selected pods' probes are not the only users of.
    templates = [o["spec"]["template"]["metadata"].get("labels", {})
                 for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    def selects(selector, labels):
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))
    for policy in by_kind.get("NetworkPolicy", {}).values():
        selector = policy["spec"]["podSelector"]
        if not any(selects(selector, labels) for labels in templates):
            fail(where, f"NetworkPolicy {policy['metadata']['name']} selects no pod")
        for rule in policy["spec"].get("ingress", []):
            for source in rule.get("from", []):
                if "podSelector" in source and not any(selects(source["podSelector"], l) for l in templates):
                    fail(where, f"NetworkPolicy {policy['metadata']['name']} admits traffic from no pod")
    grace = {"sluice-ingress": ("ingress", 25000), "sluice-worker": ("worker", 25000)}
    for name, (section, default) in grace.items():
        d = by_kind.get("Deployment", {}).get(name)
        if not d:
            fail(where, f"no Deployment {name}")
            continue
        configured = config.get(section, {}).get("shutdown_grace_ms", default) / 1000
        period = pod_spec(d).get("terminationGracePeriodSeconds", 30)
        if period < configured + 5:
            fail(where, f"{name}: terminationGracePeriodSeconds {period} < shutdown grace {configured} s + 5")
    for d in by_kind.get("Deployment", {}).values():
        for c in containers(d):
            ports = {p["name"] for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    fail(where, f"{d['metadata']['name']}: {probe} port {port} is not a container port")
            if d["metadata"]["name"].startswith("sluice-") and "resources" not in c:
                fail(where, f"{d['metadata']['name']}: no resource requests")
    for name in ("sluice-ingress", "sluice-worker", "sluice-scaler"):
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                if p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == name]
        if not pdbs:
            fail(where, f"no PodDisruptionBudget for {name}")
    hpa = by_kind.get("HorizontalPodAutoscaler", {}).get("sluice-ingress")
    if hpa:
        targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
        if targets != {"cpu": 70, "memory": 80}:
            fail(where, f"ingress HPA targets {targets}, expected cpu 70 and memory 80")
        b = hpa["spec"]["behavior"]
        up = {(p["type"], p["value"], p["periodSeconds"]) for p in b["scaleUp"]["policies"]}
        if up != {("Percent", 100, 15), ("Pods", 4, 15)} or b["scaleUp"].get("selectPolicy") != "Max":
            fail(where, f"ingress HPA scale-up {up}")
        down = {(p["type"], p["value"], p["periodSeconds"]) for p in b["scaleDown"]["policies"]}
        if down != {("Percent", 10, 60)} or b["scaleDown"].get("stabilizationWindowSeconds") != 300:
            fail(where, f"ingress HPA scale-down {down}")
    else:
        fail(where, "no HPA for sluice-ingress")
    scaler_svc = by_kind.get("Service", {}).get("sluice-scaler")
    scaler_port = scaler_svc["spec"]["ports"][0]["port"] if scaler_svc else None
    pools = {p["name"] for p in config.get("pools", [])}
    sos = by_kind.get("ScaledObject", {})
    if not sos:
        fail(where, "no ScaledObject")
    for so in sos.values():
        spec = so["spec"]
        if so["apiVersion"] != "keda.sh/v1alpha1":
            fail(where, f"ScaledObject apiVersion {so['apiVersion']}")
        if spec["scaleTargetRef"]["name"] not in by_kind.get("Deployment", {}):
            fail(where, f"ScaledObject targets unknown {spec['scaleTargetRef']['name']}")
        if "fallback" not in spec or spec["fallback"].get("replicas", 0) < 1:
            fail(where, "ScaledObject needs a fallback with replicas")
        types = [t["type"] for t in spec["triggers"]]
        if "external" not in types or "external-push" not in types:
            fail(where, f"ScaledObject triggers {types}: need external and external-push")
        for t in spec["triggers"]:
            m = t["metadata"]
            # KEDA's operator dials from its own namespace: the Service's name with ours.
            namespace = so["metadata"].get("namespace", "sluice")
            if m.get("scalerAddress") != f"sluice-scaler.{namespace}.svc:{scaler_port}":
                fail(where, f"trigger scalerAddress {m.get('scalerAddress')} is not the scaler Service of namespace {namespace}")
            if m.get("pool") not in pools:
                fail(where, f"trigger pool {m.get('pool')} is not a configured pool")
            if not all(isinstance(v, str) for v in m.values()):
                fail(where, "trigger metadata values must be strings")
        for key in ("minReplicaCount", "maxReplicaCount"):
            if not isinstance(spec.get(key), int):
                fail(where, f"ScaledObject {key} must be an integer")
        # KEDA presents a client certificate to the scaler's mutual TLS.
        for t in spec["triggers"]:
            auth = by_kind.get("TriggerAuthentication", {}).get(t.get("authenticationRef", {}).get("name"))
            params = {r["parameter"] for r in auth["spec"].get("secretTargetRef", [])} if auth else set()
            if not {"caCert", "tlsClientCert", "tlsClientKey"} <= params:
                fail(where, f"trigger {t['type']}: needs an authenticationRef with caCert, tlsClientCert and tlsClientKey")
    check_scaler_tls(where, config, by_kind)
    check_webhook_keys(where, config, by_kind)
    check_secret_modes(where, by_kind)


def check_scaler_tls(where, config, by_kind):
    """The scaler serves gRPC over mutual TLS, from files its pod mounts."""
    scaler = config.get("scaler", {})
    tls = scaler.get("tls")
    if not tls:
        fail(where, "scaler.tls is not set: KEDA would reach the scaler in plain text")
        return
    d = by_kind.get("Deployment", {}).get("sluice-scaler")
    if not d:
        fail(where, "no Deployment sluice-scaler")
        return
    mounts = secret_mounts(d)
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = tls.get(key, "")
        if not any(path.startswith(m) for m in mounts):
            fail(where, f"scaler.tls.{key} {path!r} is not in a Secret volume the scaler mounts")


def secret_mounts(d):
    """The mount paths (with a trailing slash) of a Deployment's Secret volumes."""
    secrets = {v["name"] for v in pod_spec(d).get("volumes", []) if "secret" in v}
    return [m["mountPath"].rstrip("/") + "/" for c in containers(d) for m in c.get("volumeMounts", []) if m["name"] in secrets]


def check_webhook_keys(where, config, by_kind):
    """The ingress and the workers read the keyring that seals webhook secrets from a mounted Secret."""
    path = config.get("webhooks", {}).get("secret_keys_file", "")
    if not path:
        fail(where, "webhooks.secret_keys_file is not set: the ingress and the workers refuse to start without it")
        return
    for name in ("sluice-ingress", "sluice-worker"):
        d = by_kind.get("Deployment", {}).get(name)
        if d and not any(path.startswith(m) for m in secret_mounts(d)):
            fail(where, f"{name}: webhooks.secret_keys_file {path!r} is not in a Secret volume it mounts")


def check_secret_modes(where, by_kind):
    """A Secret volume is readable by the image's user (10001, not root):
    world-readable, or group-readable with the pod's fsGroup set."""
    for name, d in by_kind.get("Deployment", {}).items():
        spec = pod_spec(d)
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        for v in spec.get("volumes", []):
            if "secret" not in v:
                continue
            mode = v["secret"].get("defaultMode", 0o644)
            if not (mode & 0o004 or (mode & 0o040 and fs_group is not None)):
                fail(where, f"{name}: Secret volume {v['name']} (mode {mode:o}) is unreadable by the image's user: "
                            "make it group-readable and set the pod's fsGroup")


def validate_schemas(where, objects):
    for o in objects:
        if o["apiVersion"] in ("keda.sh/v1alpha1", "monitoring.coreos.com/v1"):
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(where, f"{o['kind']}/{o['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
        except Exception as e:  # an unknown kind or version
            fail(where, f"{o['kind']}/{o['metadata']['name']}: {e}")


def check_metrics(objects):
    sources = []
    for base, _, files in os.walk(ROOT):
        if "/target" in base or "/." in base:
            continue
        sources += [open(os.path.join(base, f)).read() for f in files if f.endswith(".rs")]
    code = "\n".join(sources)
    queries = []
    for o in objects:
        if o["kind"] == "PrometheusRule":
            queries += [r["expr"] for g in o["spec"]["groups"] for r in g["rules"]]
            for g in o["spec"]["groups"]:
                for r in g["rules"]:
                    if not {"alert", "expr", "labels", "annotations"} <= set(r):
                        fail("alerts", f"rule {r.get('alert')} lacks a field")
        if o["kind"] == "ConfigMap" and "sluice-dashboard.json" in o.get("data", {}):
            dash = json.loads(o["data"]["sluice-dashboard.json"])
            queries += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    if not queries:
        fail("monitoring", "no alert rules or dashboard found")
    for q in queries:
        for name in set(re.findall(r"\bsluice_[a-z_]+", q)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if f'"{base}"' not in code:
                fail("monitoring", f"`{name}` is not a metric the code records")


def check_nats_config(where, objects, nats_server):
    """nats-server itself parses each rendered NATS config (unknown or misspelt
    keys fail), with the ConfigMaps its pod mounts laid out as the pod sees
    them (the users file it includes) and every variable it reads set."""
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for o in objects:
        if o["kind"] != "StatefulSet" or o["metadata"]["name"] != "nats":
            continue
        spec = pod_spec(o)
        volumes = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        env = dict(os.environ, POD_NAME="nats-0")
        for c in containers(o):
            for e in c.get("env", []):
                env.setdefault(e["name"], "check-value")
        with tempfile.TemporaryDirectory() as root:
            config = None
            for c in containers(o):
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        continue
                    directory = os.path.join(root, m["mountPath"].lstrip("/"))
                    os.makedirs(directory, exist_ok=True)
                    for name, text in configmaps.get(volumes[m["name"]], {}).items():
                        with open(os.path.join(directory, name), "w") as f:
                            f.write(text)
                        if name == "nats.conf":
                            config = os.path.join(directory, name)
            if config is None:
                fail(where, "the NATS pod mounts no nats.conf")
                continue
            done = subprocess.run([nats_server, "-c", config, "-t"], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                fail(where, f"nats-server refuses the NATS config: {(done.stderr or done.stdout).strip()}")
            text = "".join(open(os.path.join(d, f)).read() for d, _, fs in os.walk(root) for f in fs)
            for var in sorted(set(re.findall(r":\s*\$([A-Z][A-Z0-9_]+)", text))):
                if var not in {e["name"] for c in containers(o) for e in c.get("env", [])}:
                    fail(where, f"the NATS config reads ${var}, which the NATS pod's environment does not set")


def nats_version(nats_server):
    """The version of the nats-server binary the tests run, e.g. "2.15.1"."""
    done = subprocess.run([nats_server, "--version"], capture_output=True, text=True)
    found = re.search(r"v?(\d+\.\d+\.\d+)", done.stdout + done.stderr)
    if not found:
        fail("tools", f"could not read the version of {nats_server}")
    return found.group(1) if found else None


def check_nats_image(where, objects, tested):
    """The NATS image is pinned to the exact nats-server version the test
    suite runs (scripts/requirements.txt): atomic-batch fixes land in patch
    releases, and a floating tag would run a server nothing here tested."""
    for o in objects:
        if o["kind"] != "StatefulSet" or o["metadata"]["name"] != "nats":
            continue
        for c in containers(o):
            if c["name"] != "nats":
                continue
            image = c.get("image", "")
            if not re.fullmatch(rf"nats:{re.escape(tested)}(-alpine)?", image):
                fail(where, f"the NATS image {image!r} must be pinned to the tested nats-server {tested} (nats:{tested}-alpine)")


def check_nats_users(where, objects):
    """Each Sluice component connects as a user the NATS config defines,
    with its password from a Secret."""
    users = next((d.get("users.conf", "") for o in objects if o["kind"] == "ConfigMap"
                  for d in [o.get("data", {})] if "users.conf" in d), "")
    defined = set(re.findall(r"user:\s*([\w-]+)", users))
    for name in ("sluice-ingress", "sluice-worker", "sluice-scaler"):
        d = next((o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name), None)
        if not d:
            continue
        env = {e["name"]: e for c in containers(d) for e in c.get("env", [])}
        user = env.get("SLUICE__NATS__USER", {}).get("value")
        if user not in defined:
            fail(where, f"{name}: SLUICE__NATS__USER {user!r} is not a user of the NATS config ({sorted(defined)})")
        if "secretKeyRef" not in env.get("SLUICE__NATS__PASSWORD", {}).get("valueFrom", {}):
            fail(where, f"{name}: SLUICE__NATS__PASSWORD must come from a Secret")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="directory of the built Sluice binaries")
    parser.add_argument("--nats-server", help="a nats-server binary: the NATS configs are tested with it (`-t`)")
    args = parser.parse_args()
    check_dockerfile(args.bin)
    rendered = {}
    for name in ("base", "overlays/dev", "overlays/production"):
        objects = render(os.path.join(DEPLOY, name))
        rendered[name] = objects
        validate_schemas(name, objects)
        check_commands(name, objects, args.bin)
        check_structure(name, objects)
        check_nats_users(name, objects)
        print(f"{name}: {len(objects)} objects")
    check_metrics(rendered["overlays/production"])
    if args.nats_server:
        tested = nats_version(args.nats_server)
        for name, objects in rendered.items():
            check_nats_config(name, objects, args.nats_server)
            if tested:
                check_nats_image(name, objects, tested)
    prod = rendered["overlays/production"]
    nats_conf = next(o for o in prod if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "nats-config")
    if "sync_interval: always" not in nats_conf["data"]["nats.conf"]:
        fail("overlays/production", "the production NATS config must choose its durability mode explicitly")
    for name in ("sluice-ingress", "sluice-worker"):
        deployment = next(o for o in prod if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
        env = {e["name"]: e.get("value") for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        if env.get("SLUICE__NATS__GROUP_COMMIT") != "true":
            fail("overlays/production", f"{name} must batch its synced writes (SLUICE__NATS__GROUP_COMMIT=true)")
    # Every ingress and worker pod keeps up to two atomic batches in flight
    # per stream; the NATS servers must allow that many at the largest scale.
    hpa = next(o for o in prod if o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == "sluice-ingress")
    scaled = next(o for o in prod if o["kind"] == "ScaledObject" and o["metadata"]["name"] == "sluice-worker")
    pods = hpa["spec"]["maxReplicas"] + scaled["spec"]["maxReplicaCount"]
    allowed = re.search(r"max_inflight_per_stream:\s*(\d+)", nats_conf["data"]["nats.conf"])
    if not allowed or int(allowed.group(1)) < 2 * pods:
        fail("overlays/production", f"NATS must allow 2 atomic batches per pod in flight per stream ({2 * pods}): jetstream.limits.batch.max_inflight_per_stream")
    for f in failures:
        print("FAIL", f)
    if failures:
        sys.exit(1)
    print("deploy: manifests valid")


if __name__ == "__main__":
    main()
