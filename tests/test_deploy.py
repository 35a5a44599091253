"""Static checks of deploy/ (profiles, Compose, Kubernetes, Grafana, Prometheus; none of
them is run here) and unit tests of the `symram up` process plumbing."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from symram_vllm.config import SymramConfig, load_config
from symram_vllm.serving import stack
from symram_vllm.serving.engine_process import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROFILES = sorted((DEPLOY / "profiles").glob("*.yaml"))


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SYMRAM_"):
            monkeypatch.delenv(key)


# -- profiles --------------------------------------------------------------------------


def test_three_profiles_exist():
    assert [p.stem for p in PROFILES] == ["cloud", "server", "workstation"]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_loads_through_load_config(path, clean_env):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path=path)
    # Every key in the file is a real field, and took effect (not a default by accident).
    assert set(raw) <= set(SymramConfig.model_fields)
    assert config.dram_bytes > 1 << 30 and config.disk_path is not None
    assert config.disk_bytes >= config.dram_bytes
    for key in ("codec", "save_decode_blocks", "transfer_threads", "control_port"):
        if key in raw:
            assert getattr(config, key) == raw[key]


def test_a_typo_in_a_profile_is_rejected(tmp_path, clean_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "profiles" / "server.yaml").read_text() + "dram_byte: 1GiB\n")
    with pytest.raises(ValueError, match="dram_byte"):
        load_config(path=bad)


# -- Docker / Compose -----------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker" / "docker-compose.yml").read_text())


def env_to_field(name: str) -> str | None:
    if name == "SYMRAM_CONFIG":
        return None
    assert name.startswith("SYMRAM_"), name
    return name.removeprefix("SYMRAM_").lower()


def backend_spec(value: str) -> dict[str, str]:
    """The gateway's --backend URL[,key=value...] syntax."""
    url, *options = value.split(",")
    return {"url": url, **dict(option.split("=", 1) for option in options)}


def test_compose_services_and_roles():
    services = compose()["services"]
    roles = {name: svc["labels"]["symram.role"] for name, svc in services.items()}
    assert roles["redis"] == "redis" and roles["gateway"] == "gateway"
    engines = sorted(n for n, r in roles.items() if r == "engine")
    assert engines == ["engine-0", "engine-1"]
    fields = set(SymramConfig.model_fields)
    gateway_cmd = services["gateway"]["command"]
    specs = [backend_spec(gateway_cmd[i + 1])
             for i, a in enumerate(gateway_cmd) if a == "--backend"]
    backends = [spec["url"] for spec in specs]
    for name in engines:
        svc = services[name]
        env = svc["environment"]
        assert env["SYMRAM_INSTANCE_ID"] == name
        assert "SYMRAM_DIRECTORY_URL" not in env  # it carries the password: see below
        for key in env:
            field = env_to_field(key)
            assert field is None or field in fields, key
        port = svc["command"][svc["command"].index("--port") + 1]
        assert port in [str(p) for p in svc["expose"]]
        assert env["SYMRAM_CONTROL_PORT"] in [str(p) for p in svc["expose"]]
        spec = specs[backends.index(f"http://{name}:{port}")]
        assert spec["control"] == f"http://{name}:{env['SYMRAM_CONTROL_PORT']}"
        assert spec["name"] == name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        gpu = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["capabilities"] == ["gpu"]
        # Mounted files exist in the repository.
        for volume in svc["volumes"]:
            source = volume.split(":")[0]
            if source.startswith(".."):
                assert (DEPLOY / "docker" / source).resolve().exists(), source
    assert len(backends) == len(engines)
    assert set(services["gateway"]["depends_on"]) == set(engines)
    # Distinct GPUs per engine.
    gpus = [services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for n in engines]
    assert gpus == [["0"], ["1"]]


def test_dockerfile_copies_what_exists_and_exposes_the_ports():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    exposed = re.search(r"^EXPOSE (.+)$", text, re.M)
    assert exposed and set(exposed.group(1).split()) == {"8000", "9100"}
    assert 'ENTRYPOINT ["symram"]' in text
    assert "127.0.0.1:8000/health" in text


def test_prometheus_scrapes_the_compose_services():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    services = compose()["services"]
    for target in targets:
        host, port = target.split(":")
        assert host in services
        cmd = services[host]["command"]
        assert cmd[cmd.index("--port") + 1] == port
    assert {"engine-0:8000", "engine-1:8000", "gateway:8000"} == targets


# -- Kubernetes ------------------------------------------------------------------------


def k8s() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "symram.yaml").read_text()) if d]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s() if d["kind"] == kind}


def test_k8s_kinds():
    kinds = sorted({d["kind"] for d in k8s()})
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim",
                     "Service", "StatefulSet"]
    assert set(by_kind("Deployment")) == {"symram-redis", "symram-gateway"}
    assert set(by_kind("StatefulSet")) == {"symram-engine"}


def test_k8s_services_select_pods_and_name_their_ports():
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"]
        pods = [w for w in workloads.values()
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, name
        port_names = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    for name, workload in workloads.items():
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"].items() <= (
            spec["template"]["metadata"]["labels"].items()), name
        for container in spec["template"]["spec"]["containers"]:
            names = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in names, (name, probe)


def test_k8s_references_resolve_and_gateway_targets_every_engine():
    configmaps, claims = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim")
    engine = by_kind("StatefulSet")["symram-engine"]
    pod = engine["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in configmaps
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    container = pod["containers"][0]
    mounted = {m["name"] for m in container["volumeMounts"]}
    templates = {t["metadata"]["name"] for t in engine["spec"].get("volumeClaimTemplates", [])}
    assert mounted == {v["name"] for v in pod["volumes"]} | templates
    for ref in container.get("envFrom", []):
        assert ref["configMapRef"]["name"] in configmaps
    fields = set(SymramConfig.model_fields)
    for env in container["env"]:
        field = env_to_field(env["name"])
        assert field is None or field in fields
    # $(VAR) in args come from the env or envFrom config maps.
    provided = {e["name"] for e in container["env"]} | {
        k for ref in container["envFrom"] for k in configmaps[ref["configMapRef"]["name"]]["data"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert var in provided, var
    # The gateway discovers every engine pod through the headless service (issue I, 7):
    # no backend list to keep in step with `replicas`.
    service = by_kind("Service")[engine["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    args = by_kind("Deployment")["symram-gateway"]["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--backend" not in args
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    config = gateway_config_of(args, {})
    assert [d.url for d in config.discover] == [
        f"http://{service['metadata']['name']}:{ports['http']}"]
    assert config.discover[0].control_port == ports["control"]
    assert {p["port"] for p in service["spec"]["ports"]} == {ports["http"], ports["control"]}
    config_map = yaml.safe_load(configmaps["symram-config"]["data"]["symram.yaml"])
    assert config_map["control_port"] == ports["control"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Grace period covers the DRAM->disk flush on shutdown.
    config = yaml.safe_load(configmaps["symram-config"]["data"]["symram.yaml"])
    assert pod["terminationGracePeriodSeconds"] > config["flush_on_exit_s"]


def test_k8s_config_is_the_cloud_profile(tmp_path, clean_env):
    text = by_kind("ConfigMap")["symram-config"]["data"]["symram.yaml"]
    (tmp_path / "k8s.yaml").write_text(text)
    in_k8s = load_config(path=tmp_path / "k8s.yaml")
    assert in_k8s == load_config(path=DEPLOY / "profiles" / "cloud.yaml")
    # The directory URL carries the Redis password: a secret, never the ConfigMap.
    assert in_k8s.directory_url is None
    assert "symram-redis" in by_kind("Service")


# -- safe as shipped (issue J, findings 4, 9, 11; issue I, 7) ------------------------


def gateway_config_of(args: list[str], env: dict[str, str]):
    """The GatewayConfig the gateway's own command line makes of `args`."""
    from symram_vllm.serving.gateway.__main__ import build_parser, config_from_args

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("SYMRAM_GATEWAY_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return config_from_args(build_parser().parse_args(args))


@pytest.fixture
def compose_secrets(tmp_path):
    """The secrets directory make-secrets.sh writes, run for real in a copy."""
    script = tmp_path / "make-secrets.sh"
    shutil.copy(DEPLOY / "docker" / "make-secrets.sh", script)
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    again = subprocess.run(["sh", str(script)], check=True, capture_output=True, text=True)
    assert "wrote" not in again.stdout  # idempotent: secrets are not replaced
    secrets_dir = tmp_path / "secrets"
    assert secrets_dir.stat().st_mode & 0o077 == 0
    return secrets_dir


def secret_mounts(service: dict) -> dict[str, str]:
    """target file name -> source secret, for a compose service."""
    out = {}
    for item in service.get("secrets", []):
        source = item if isinstance(item, str) else item["source"]
        target = source if isinstance(item, str) else item.get("target", source)
        out[target] = source
    return out


def test_compose_is_safe_as_shipped(compose_secrets, tmp_path):
    doc = compose()
    services, declared = doc["services"], doc["secrets"]
    # Every secret a service mounts is declared, and make-secrets.sh writes its file.
    for service in services.values():
        for source in secret_mounts(service).values():
            assert source in declared
    for name, spec in declared.items():
        assert (compose_secrets / Path(spec["file"]).name).stat().st_size > 0, name
    # Published ports: loopback unless the operator says otherwise; never the engines'.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith(("127.0.0.1:", "${SYMRAM_BIND:-127.0.0.1}:")), (name, port)
        if service["labels"]["symram.role"] in ("engine", "redis"):
            assert "ports" not in service, name
    # The gateway: auth on, control token and tenant salt secret, all from secrets.
    gateway = services["gateway"]
    mounts = secret_mounts(gateway)
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    for target, source in mounts.items():
        (secrets_dir / target).write_bytes(
            (compose_secrets / Path(declared[source]["file"]).name).read_bytes())
    env = {**gateway["environment"], "SYMRAM_GATEWAY_SECRETS_DIR": str(secrets_dir)}
    assert gateway["environment"]["SYMRAM_GATEWAY_SECRETS_DIR"] == "/run/secrets"
    config = gateway_config_of(gateway["command"], env)
    assert config.auth_enabled and config.protect_metrics and config.protect_dashboard
    assert config.control_token is not None and config.tenant_salt_secret is not None
    token = (compose_secrets / "control_token").read_text()
    assert config.control_token.get_secret_value() == token
    admins = [k for k in config.api_keys if k.admin]
    metrics_key = (compose_secrets / "metrics_key").read_text()
    assert [k.key.get_secret_value() for k in admins] == [metrics_key]
    # Engines: the same control token, and the directory URL with Redis's password.
    for name in ("engine-0", "engine-1"):
        engine = services[name]
        env = engine["environment"]
        assert secret_mounts(engine)["control_token"] == "control_token"
        assert env["SYMRAM_CONTROL_TOKEN_FILE"] == "/run/secrets/control_token"
        script = engine["entrypoint"][2]
        assert "redis://:$$(cat /run/secrets/redis_password)@redis:6379/0" in script
        assert "redis_password" in secret_mounts(engine)
    # Redis requires the password; its health check uses it.
    redis = services["redis"]
    assert "--requirepass" in redis["command"][-1]
    assert "/run/secrets/redis_password" in redis["command"][-1]
    assert "-a" in redis["healthcheck"]["test"][1]
    # Grafana: no anonymous access, admin password from a secret.
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in secret_mounts(services["grafana"])
    # Prometheus scrapes the gateway's protected /metrics with the admin key.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "symram-gateway")
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_key"
    assert "metrics_key" in secret_mounts(services["prometheus"])


def test_k8s_is_safe_as_shipped():
    engine_pod = by_kind("StatefulSet")["symram-engine"]["spec"]["template"]["spec"]
    gateway_pod = by_kind("Deployment")["symram-gateway"]["spec"]["template"]["spec"]
    redis_pod = by_kind("Deployment")["symram-redis"]["spec"]["template"]["spec"]

    def secret_env(pod: dict) -> dict[str, tuple[str, str]]:
        return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"],
                            e["valueFrom"]["secretKeyRef"]["key"])
                for c in pod["containers"] for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}

    engine_env, gateway_env = secret_env(engine_pod), secret_env(gateway_pod)
    redis_env = secret_env(redis_pod)
    # The control token: one secret, sent by the gateway, required by the engines.
    assert engine_env["SYMRAM_CONTROL_TOKEN"] == gateway_env["SYMRAM_GATEWAY_CONTROL_TOKEN"]
    # Auth on, tenant salts keyed, the directory URL (with the password) a secret.
    assert {"SYMRAM_GATEWAY_API_KEYS", "SYMRAM_GATEWAY_TENANT_SALT_SECRET"} <= set(gateway_env)
    assert "SYMRAM_DIRECTORY_URL" in engine_env
    # Every referenced secret key appears in the documented `kubectl create secret`.
    header = (DEPLOY / "k8s" / "symram.yaml").read_text().split("apiVersion", 1)[0]
    for name, key in {**engine_env, **gateway_env, **redis_env}.values():
        assert name in header and f"--from-literal={key}=" in header, (name, key)
    # Redis: a password, and TLS only.
    args = redis_pod["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "REDIS_PASSWORD" in redis_env
    assert args[args.index("--port") + 1] == "0" and "--tls-port" in args
    assert "rediss://" in header and "ssl_ca_certs=/etc/symram-redis-tls/ca.crt" in header
    ca_mount = next(m for m in engine_pod["containers"][0]["volumeMounts"]
                    if m["name"] == "redis-ca")
    assert ca_mount["mountPath"] == "/etc/symram-redis-tls"
    # The control port is reachable from the gateway pods only.
    policy = by_kind("NetworkPolicy")["symram-engine"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "symram-engine"}
    assert policy["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in engine_pod["containers"][0]["ports"]}
    gateway_labels = by_kind("Deployment")["symram-gateway"]["spec"]["template"]["metadata"][
        "labels"]
    for rule in policy["ingress"]:
        if any(p["port"] == ports["control"] for p in rule["ports"]):
            assert all(peer.get("podSelector", {}).get("matchLabels", {}).items()
                       <= gateway_labels.items() and "namespaceSelector" not in peer
                       for peer in rule["from"])
    assert any(p["port"] == ports["control"] for r in policy["ingress"] for p in r["ports"])
    redis_policy = by_kind("NetworkPolicy")["symram-redis"]["spec"]
    assert redis_policy["podSelector"]["matchLabels"] == {"app": "symram-redis"}
    # The disk tier outlives a pod: a volumeClaimTemplate, not an emptyDir.
    engine = by_kind("StatefulSet")["symram-engine"]
    claim = next(t for t in engine["spec"]["volumeClaimTemplates"]
                 if t["metadata"]["name"] == "tier")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert all(v["name"] != "tier" for v in engine_pod["volumes"])
    mount = next(m for m in engine_pod["containers"][0]["volumeMounts"] if m["name"] == "tier")
    config = yaml.safe_load(by_kind("ConfigMap")["symram-config"]["data"]["symram.yaml"])
    assert Path(config["disk_path"]).is_relative_to(mount["mountPath"])
    assert config["control_host"] == "0.0.0.0" and "control_token" not in config


# -- Grafana ---------------------------------------------------------------------------


def _strip(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", name)


def known_metric_names() -> set[str]:
    """symram:* from the connector's stats module (parsed, no vLLM import) and vllm:*
    from the installed vLLM's metrics loggers."""
    tree = ast.parse((ROOT / "symram_vllm" / "connectors" / "vllm_stats.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id in ("COUNTERS", "GAUGES"):
            value = node.value  # type: ignore[attr-defined]
            assert isinstance(value, ast.Dict)
            for key in value.keys:
                assert isinstance(key, ast.Constant)
                suffix = "_total" if target.id == "COUNTERS" else ""
                names.add(f"symram:{key.value}{suffix}")
        if isinstance(target, ast.Name) and target.id == "HISTOGRAMS":  # name: (metric, doc)
            names |= {f"symram:{v.elts[0].value}" for v in node.value.values}  # type: ignore
    assert len(names) > 20
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.submodule_search_locations:
        loggers = Path(next(iter(spec.submodule_search_locations))) / "v1/metrics/loggers.py"
        names |= set(re.findall(r'name="(vllm:[a-z_]+)"', loggers.read_text()))
    gateway = ROOT / "symram_vllm" / "serving" / "gateway" / "metrics.py"
    if gateway.exists():
        names |= set(re.findall(r'"(symram_gateway_[a-z_]+)"', gateway.read_text()))
    return {_strip(n) for n in names}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "symram-dashboard.json").read_text())


def test_grafana_dashboard_references_only_real_metrics():
    known = known_metric_names()
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\b((?:vllm|symram):[a-z_0-9]+|symram_gateway_[a-z_]+)",
                               target["expr"])
            assert names, target["expr"]
            used |= {_strip(n) for n in names}
    vllm_known = any(n.startswith("vllm:") for n in known)
    unknown = {n for n in used if n not in known and (not n.startswith("vllm:") or vllm_known)}
    assert not unknown, unknown
    # The tier story is on the dashboard.
    for name in ("symram:dram_hits", "symram:disk_hits", "symram:loaded_blocks",
                 "vllm:external_prefix_cache_hits", "vllm:time_to_first_token_seconds",
                 "symram_gateway_route_decisions", "symram_gateway_ttft_seconds"):
        assert name in used, name


def test_grafana_dashboard_is_the_generator_output_and_provisioned():
    spec = importlib.util.spec_from_file_location(
        "make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DEPLOY / "grafana" / "symram-dashboard.json").read_text() == module.render()
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "symram.yml").read_text())
    grafana = compose()["services"]["grafana"]
    mounted = [v.split(":")[1] for v in grafana["volumes"]]
    assert any(m.startswith(provider["providers"][0]["options"]["path"]) for m in mounted)


# -- symram up plumbing ----------------------------------------------------------------


def test_plan_without_gateway_serves_the_engine_on_the_public_port(monkeypatch, tmp_path):
    monkeypatch.setattr(stack, "gateway_available", lambda: False)
    port = free_port()
    options = stack.UpOptions(port=port, state_dir=tmp_path, disk_bytes="1GiB")
    plan = stack.plan_stack(options, "/models/m")
    names = [p.name for p in plan.processes.processes]
    assert names[-1] == "engine-0" and "gateway" not in names
    engine = plan.processes.processes[-1]
    assert engine.cmd[engine.cmd.index("--port") + 1] == str(port)
    assert engine.env["SYMRAM_DISK_PATH"] == str((tmp_path / "disk").resolve())
    assert engine.env["SYMRAM_DISK_BYTES"] == "1GiB"
    assert int(engine.env["SYMRAM_CONTROL_PORT"]) in engine.ports
    assert any("gateway" in note for note in plan.notes)
    if shutil.which("redis-server"):
        assert names[0] == "redis"
        assert engine.env["SYMRAM_DIRECTORY_URL"] == plan.redis_url
    with pytest.raises(stack.StartupError, match="gateway"):
        stack.plan_stack(stack.UpOptions(port=port, instances=2, state_dir=tmp_path), "m")


def test_plan_with_gateway_puts_n_engines_behind_it(monkeypatch, tmp_path):
    monkeypatch.setattr(stack, "gateway_available", lambda: True)
    port = free_port()
    plan = stack.plan_stack(stack.UpOptions(port=port, instances=3, state_dir=tmp_path,
                                            redis=False, disk_bytes="0"), "/models/m")
    names = [p.name for p in plan.processes.processes]
    assert names == ["engine-0", "engine-1", "engine-2", "gateway"]
    assert [p.stop_level for p in plan.processes.processes] == [1, 1, 1, 0]
    gateway = plan.processes.processes[-1]
    assert gateway.cmd[:3] == [sys.executable, "-m", stack.GATEWAY_MODULE]
    backends = [gateway.cmd[i + 1] for i, a in enumerate(gateway.cmd) if a == "--backend"]
    engines = plan.processes.processes[:3]
    assert backends == [
        f"{url},control=http://127.0.0.1:{e.env['SYMRAM_CONTROL_PORT']},name=engine-{i}"
        for i, (url, e) in enumerate(zip(plan.engines, engines, strict=True))]
    assert len(set(plan.engines)) == 3
    ports = [p for proc in plan.processes.processes for p in proc.ports]
    assert len(ports) == len(set(ports))  # engines, control endpoints, gateway: distinct
    assert all("SYMRAM_DISK_PATH" not in e.env and "SYMRAM_DIRECTORY_URL" not in e.env
               for e in engines)
    assert [e.env["SYMRAM_INSTANCE_ID"] for e in engines] == ["engine-0", "engine-1", "engine-2"]
    # With a disk tier, all engines get one shared path (each writes its own slot).
    shared = stack.plan_stack(stack.UpOptions(port=free_port(), instances=2, state_dir=tmp_path,
                                              redis=False, disk_bytes="1GiB"), "/models/m")
    paths = {p.env["SYMRAM_DISK_PATH"] for p in shared.processes.processes[:2]}
    assert paths == {str((tmp_path / "disk").resolve())}


def test_plan_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(stack.StartupError, match="in use"):
            stack.plan_stack(stack.UpOptions(port=busy, state_dir=tmp_path), "m")


def test_default_model_is_the_demo_model_in_the_state_dir(monkeypatch, tmp_path):
    calls = []

    def fake_build(path, size):
        calls.append((path, size))
        return path

    import symram_vllm.demo_model as demo

    monkeypatch.setattr(demo, "build_demo_model", fake_build)
    model = stack.resolve_model(stack.UpOptions(state_dir=tmp_path, size="tiny"))
    assert calls == [(tmp_path / "models" / "tiny", "tiny")] and model == str(calls[0][0])
    assert stack.resolve_model(stack.UpOptions(model="/my/model")) == "/my/model"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_managed_process_stop_kills_the_whole_group(tmp_path):
    # A shell that ignores SIGTERM and has a background grandchild.
    script = "trap '' TERM; sleep 300 & echo $! > grandchild; while true; do sleep 1; done"
    proc = stack.ManagedProcess("stubborn", ["bash", "-c", script], tmp_path / "log",
                                cwd=tmp_path)
    proc.start()
    # The whole line: the shell creates the file before it writes the pid into it.
    noted = tmp_path / "grandchild"
    deadline = time.monotonic() + 30
    while not (noted.exists() and noted.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the shell did not start its grandchild"
        time.sleep(0.05)
    grandchild = int(noted.read_text())
    assert proc.healthy() and _alive(grandchild)
    started = time.monotonic()
    proc.stop(grace_s=1.0)
    assert time.monotonic() - started < 15
    assert proc.returncode() == -signal.SIGKILL
    assert not _alive(grandchild)
    assert "trap" in proc.log_tail()


def test_process_set_stops_a_level_in_parallel_and_levels_in_order(tmp_path):
    # Each takes 1 s to exit after SIGTERM and records when it got the signal.
    processes = stack.ProcessSet()
    for name, level in (("redis", 2), ("engine-0", 1), ("engine-1", 1), ("gateway", 0)):
        script = (f"trap 'date +%s.%N > {tmp_path / name}; sleep 1; exit 0' TERM; "
                  f"touch {tmp_path / name}.ready; while true; do sleep 0.05; done")
        processes.add(stack.ManagedProcess(name, ["bash", "-c", script],
                                           tmp_path / f"{name}.log", stop_level=level))
    processes.start()
    # Each shell has set its trap (a fixed sleep was not always enough on a busy host:
    # a SIGTERM before the trap kills the shell at once).
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"{p.name}.ready").exists() for p in processes.processes):
        assert time.monotonic() < deadline, "the shells did not start"
        time.sleep(0.05)
    started = time.monotonic()
    processes.stop(grace_s=10)
    elapsed = time.monotonic() - started
    got = {name: float((tmp_path / name).read_text()) for name in
           ("gateway", "engine-0", "engine-1", "redis")}
    # Three levels of ~1 s each, each awaited (not the 10 s grace): room for a busy
    # host's slow forks above 3 s.
    assert 2.5 < elapsed < 8.0, elapsed
    assert got["gateway"] < got["engine-0"] < got["redis"]
    # The two engines overlapped instead of adding up: one after the other, the second
    # would get its signal >= 1 s after the first.
    assert abs(got["engine-0"] - got["engine-1"]) < 0.8
    assert got["redis"] - got["engine-0"] >= 0.9
    assert all(p.returncode() == 0 for p in processes.processes)


def test_wait_healthy_reports_a_process_that_dies(tmp_path):
    processes = stack.ProcessSet()
    processes.add(stack.ManagedProcess("dies", ["bash", "-c", "echo boom; exit 3"],
                                       tmp_path / "dies.log", health=lambda: False))
    processes.start()
    with pytest.raises(stack.StartupError, match=r"dies exited with code 3(.|\n)*boom"):
        processes.wait_healthy(timeout_s=30, quiet=True)
    processes.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_comes_up_healthy_and_leaves_its_port_free(tmp_path):
    port = free_port()
    redis = stack.ManagedProcess("redis", stack.redis_command(port, tmp_path),
                                 tmp_path / "redis.log", stack.redis_health(port))
    processes = stack.ProcessSet()
    processes.add(redis)
    with stack.running(processes, timeout_s=30, quiet=True):
        assert stack.redis_health(port)()
        assert not stack.port_is_free(port)
        out = subprocess.run(["redis-cli", "-p", str(port), "CONFIG", "GET", "save"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split("\n")[1] == ""  # nothing persisted
    assert not redis.running()
    assert stack.port_is_free(port)
    assert not stack.redis_health(port)()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_up_starts_its_redis_with_a_password_no_other_user_can_read(monkeypatch, tmp_path):
    """Other local users can reach 127.0.0.1: the stack's directory must not be open to
    them (forged or wiped entries). The password is in a 0600 file, not on the command
    line, and not in what `symram up` prints."""
    import redis

    monkeypatch.setattr(stack, "gateway_available", lambda: False)
    plan = stack.plan_stack(stack.UpOptions(port=free_port(), state_dir=tmp_path,
                                            disk_bytes="0"), "/models/m")
    assert plan.redis_url is not None
    password = redis.connection.parse_url(plan.redis_url)["password"]
    proc = plan.processes.processes[0]
    assert proc.name == "redis" and password not in " ".join(proc.cmd)
    conf = Path(proc.cmd[1])
    assert conf.stat().st_mode & 0o077 == 0 and password in conf.read_text()
    assert stack.without_password(plan.redis_url).count("***") == 1
    assert password not in stack.without_password(plan.redis_url)
    port = proc.ports[0]
    server = subprocess.Popen(proc.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        healthy = proc.health
        deadline = time.monotonic() + 10
        while not healthy():
            assert time.monotonic() < deadline, "redis-server did not answer with the password"
            time.sleep(0.05)
        assert not stack.redis_health(port)()  # no password: no PONG
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("forged", 1)
        assert redis.Redis.from_url(plan.redis_url).ping()
    finally:
        server.terminate()
        server.wait(10)
