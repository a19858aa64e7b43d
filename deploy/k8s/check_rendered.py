"""Cross-checks a rendered kustomization (`kubectl kustomize DIR`) against the
rpcgate.toml it ships, for what no schema sees: the Deployment and the config must
agree on ports and on the shutdown timing, and the admin listener must be on an
address the kubelet's probes and Prometheus can reach (not rpcgate's loopback default).

    kubectl kustomize deploy/k8s/overlays/sidecar | python3 deploy/k8s/check_rendered.py NAME

Exits 1 and names every mismatch. Needs PyYAML (installed with kubernetes-validate).
"""

import ipaddress
import re
import sys
import tomllib

import yaml

# rpcgate's built-in defaults for the keys checked here (src/config/types.rs,
# src/config/admin_listen.rs). The default admin address is loopback only, which
# probes and scrapes from outside the Pod cannot reach: a manifest must set it.
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9464"
DEFAULT_DELAY = "5s"
DEFAULT_DRAIN = "30s"

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(text):
    """A duration as rpcgate writes it: "30s", "250ms", "1m 30s"."""
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|s|m|h)|\s", "", text):
        raise ValueError(f"unreadable duration {text!r}")
    return sum(int(n) * UNITS[u] for n, u in parts)


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def is_loopback(addr):
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def check(name, docs):
    problems = []
    configs = {
        d["metadata"]["name"]: tomllib.loads(d["data"]["rpcgate.toml"])
        for d in docs
        if d["kind"] == "ConfigMap" and "rpcgate.toml" in d.get("data", {})
    }
    deployments = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and any(c["name"] == "rpcgate" for c in d["spec"]["template"]["spec"]["containers"])
    ]
    if not deployments:
        problems.append("no Deployment with a container named rpcgate")
    for dep in deployments:
        where = f"deployment/{dep['metadata']['name']}"
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        mounted = [
            v["configMap"]["name"]
            for v in spec.get("volumes", [])
            if "configMap" in v and v["configMap"]["name"] in configs
        ]
        if len(mounted) != 1:
            problems.append(f"{where}: mounts {len(mounted)} rpcgate.toml ConfigMaps, want 1")
            continue
        config = configs[mounted[0]]
        shutdown = config.get("shutdown", {})
        drain = seconds(shutdown.get("delay", DEFAULT_DELAY)) + seconds(
            shutdown.get("drain_timeout", DEFAULT_DRAIN)
        )
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= drain:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {grace} must exceed "
                f"shutdown.delay + shutdown.drain_timeout = {drain:g}s"
            )
        # Other containers in the Pod (a sidecar's application) must keep serving
        # until rpcgate has drained, and still stop before the grace period ends.
        for c in spec["containers"]:
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if c["name"] != "rpcgate" and sleep is not None and not drain <= sleep < grace:
                problems.append(
                    f"{where}: container {c['name']}: preStop sleep {sleep}s should be at "
                    f"least delay + drain_timeout ({drain:g}s) and below the grace period ({grace}s)"
                )
        admin_listen = config.get("admin_listen", DEFAULT_ADMIN_LISTEN)
        if admin_listen in ("", "off"):
            problems.append(f"{where}: admin_listen is off, but the probes need it")
            continue
        if is_loopback(admin_listen):
            problems.append(
                f"{where}: admin_listen is {admin_listen} (loopback only); set it to a "
                "pod address such as 0.0.0.0:9464 so probes and scrapes reach it"
            )
        rpcgate = next(c for c in spec["containers"] if c["name"] == "rpcgate")
        ports = {p["name"]: p["containerPort"] for p in rpcgate.get("ports", [])}
        want = {
            "http": port_of(config.get("listen", "127.0.0.1:8080")),
            "admin": port_of(admin_listen),
        }
        for port_name, port in want.items():
            if ports.get(port_name) != port:
                problems.append(
                    f"{where}: container port {port_name} is {ports.get(port_name)}, "
                    f"rpcgate.toml says {port}"
                )
        annotated = pod["metadata"].get("annotations", {}).get("prometheus.io/port")
        if annotated is not None and int(annotated) != want["admin"]:
            problems.append(
                f"{where}: prometheus.io/port {annotated} is not the admin port {want['admin']}"
            )
        for probe in ("livenessProbe", "readinessProbe"):
            port = rpcgate.get(probe, {}).get("httpGet", {}).get("port")
            if port not in ("admin", want["admin"]):
                problems.append(f"{where}: {probe} uses port {port!r}, not the admin port")
    for p in problems:
        print(f"ERROR {name}: {p}")
    if not problems:
        print(f"ok {name}: ports and shutdown timing match rpcgate.toml")
    return not problems


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "-"
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    return 0 if check(name, docs) else 1


if __name__ == "__main__":
    sys.exit(main())
