"""A real control plane (etcd + kube-apiserver v1.20.2 from scripts/control-plane.sh) and
what the chart tests do with it: apply objects as the administrator, and act as the
operator's ServiceAccount — by impersonation or with a real ServiceAccount token — to see
what RBAC lets it do.

Reusable outside the tests: `ControlPlane.start(dir)`, `.kubeconfig`,
`.write_sa_kubeconfig(path, namespace, name)` gives a kubeconfig any client (kubectl,
kube-rs) can use to run *as* the ServiceAccount.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "control-plane.sh"


def kubectl_binary() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: install Debian's kubernetes-client or set KUBECTL")
    return found


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass
class Response:
    status: int
    body: dict[str, Any]


class ControlPlane:
    """A running etcd + kube-apiserver; `stop()` (or the context manager) stops both."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.kubeconfig = directory / "kubeconfig"
        config = yaml.safe_load(self.kubeconfig.read_text())
        self.server: str = config["clusters"][0]["cluster"]["server"]
        self._token: str = config["users"][0]["user"]["token"]
        # The server's certificate is self-signed for loopback; the kubeconfig skips
        # verification the same way.
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE
        self.kubectl_path = kubectl_binary()

    @classmethod
    def start(cls, directory: Path) -> ControlPlane:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bash", str(SCRIPT), "start", str(directory)], check=True)
        return cls(directory)

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.dir)], check=False)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- kubectl ---------------------------------------------------------------------

    def kubectl(self, *args: str, as_user: str | None = None, stdin: str | None = None,
                check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [self.kubectl_path, f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        if as_user:
            # For a ServiceAccount user name the server adds its groups itself.
            cmd.append(f"--as={as_user}")
        cmd.extend(args)
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[1:])} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def apply(self, objects: list[dict[str, Any]], *, server_side: bool = True,
              field_manager: str = "chart-tests") -> str:
        args = ["apply", "-f", "-"]
        if server_side:
            args += ["--server-side", f"--field-manager={field_manager}"]
        return self.kubectl(*args, stdin=yaml.safe_dump_all(objects)).stdout

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        return json.loads(self.kubectl(*args).stdout)

    def wait_established(self, crd: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            conditions = self.get("crd", crd).get("status", {}).get("conditions", [])
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                # Discovery can lag the condition by a moment; wait until the resource is served.
                group = crd.split(".", 1)[1]
                if self.request("GET", f"/apis/{group}").status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {crd} not established after {timeout_s}s")
            time.sleep(0.1)

    def serves(self, group_version: str) -> bool:
        path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return self.request("GET", path).status == 200

    def can_i(self, as_user: str, verb: str, resource: str, namespace: str | None = None,
              name: str | None = None, subresource: str | None = None) -> bool:
        """`kubectl auth can-i` as `as_user` (with its ServiceAccount groups)."""
        target = resource if name is None else f"{resource}/{name}"
        args = ["auth", "can-i", verb, target]
        if subresource:
            args.append(f"--subresource={subresource}")
        args += ["-n", namespace] if namespace else ["--all-namespaces"]
        done = self.kubectl(*args, as_user=as_user, check=False)
        answer = done.stdout.strip()
        if answer not in ("yes", "no"):
            raise AssertionError(f"kubectl auth can-i gave {done.returncode}: {done.stdout}{done.stderr}")
        return answer == "yes"

    # --- raw API requests (kubectl 1.20 has no `patch --subresource`) ----------------

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", as_user: str | None = None,
                token: str | None = None) -> Response:
        headers = {"Authorization": f"Bearer {token or self._token}", "Accept": "application/json"}
        if as_user:
            # For a ServiceAccount user name the server adds its groups itself.
            headers["Impersonate-User"] = as_user
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self._tls, timeout=30) as resp:
                raw = resp.read()
                return Response(resp.status, json.loads(raw) if raw else {})
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                parsed = {"message": raw.decode(errors="replace")}
            return Response(err.code, parsed)

    # --- acting as a ServiceAccount --------------------------------------------------

    def sa_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real token for the ServiceAccount (TokenRequest API), signed by the server."""
        resp = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}},
        )
        assert resp.status == 201, f"TokenRequest for {namespace}/{name}: {resp.status} {resp.body}"
        return resp.body["status"]["token"]

    def write_sa_kubeconfig(self, path: Path, namespace: str, name: str,
                            *, impersonate: bool = False) -> Path:
        """A kubeconfig that acts as the ServiceAccount: with its own token, or (impersonate)
        through the administrator's token with `as`."""
        if impersonate:
            user: dict[str, Any] = {"token": self._token, "as": sa_user(namespace, name)}
        else:
            user = {"token": self.sa_token(namespace, name)}
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.server,
                                                       "insecure-skip-tls-verify": True}}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": name,
                                                    "namespace": namespace}}],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


# --- installing the chart's objects ------------------------------------------------------

def install_chart(plane: ControlPlane, values: dict[str, Any] | None, *, release: str,
                  namespace: str, chart: Path | None = None, upgrade: bool = False) -> list[dict[str, Any]]:
    """What `helm install --create-namespace` would create, applied by server-side apply:
    the chart's CRDs, the release namespace and every watched namespace, then the rendered
    objects. Returns the rendered objects.

    The test server is Kubernetes 1.20, the oldest the chart supports: it has
    no policy/v1, and Helm renders with its default (newer) capabilities here, so the PodDisruptionBudget is sent as policy/v1beta1, as the chart itself picks on a 1.20 server (the fields the
    chart sets are the same), and the ServiceMonitor and PrometheusRule are left out unless their CRDs are served.

    `chart`: another chart directory or packaged archive (default: this repository's chart);
    `upgrade`: render as `helm upgrade` does (the CRDs are applied as the README's upgrade
    step does, `kubectl apply --server-side -f crds/`, since Helm never upgrades them).
    """
    import chartlib  # noqa: PLC0415 — keeps `cluster` usable without Helm installed

    source = chart or chartlib.CHART_DIR
    objects = chartlib.render(values, release=release, namespace=namespace, chart=source, upgrade=upgrade)
    crds = chartlib.crds(source)
    plane.apply(crds)
    for crd in crds:
        plane.wait_established(crd["metadata"]["name"])
    watched = (values or {}).get("watchNamespaces") or []
    plane.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                 for ns in dict.fromkeys([namespace, *watched])])
    to_apply = []
    for obj in objects:
        if obj["kind"] == "PodDisruptionBudget" and not plane.serves("policy/v1"):
            obj = {**obj, "apiVersion": "policy/v1beta1"}
        if obj["kind"] in ("ServiceMonitor", "PrometheusRule") and not plane.serves(obj["apiVersion"]):
            continue
        to_apply.append(obj)
    plane.apply(to_apply)
    return objects


def _main(argv: list[str]) -> int:
    """python tests/chart/cluster.py install DIR [--release R] [--namespace NS]
    [--set k=v]... [--sa-kubeconfig PATH [--impersonate]]

    Installs the chart's objects into the control plane started by
    `scripts/control-plane.sh start DIR`, and optionally writes a kubeconfig that acts as
    the operator's ServiceAccount (for running `cohort-operator run` as it)."""
    import argparse  # noqa: PLC0415

    import helm_python as helm  # noqa: PLC0415

    import chartlib  # noqa: PLC0415

    parser = argparse.ArgumentParser(usage=_main.__doc__)
    parser.add_argument("command", choices=["install"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--release", default=chartlib.RELEASE)
    parser.add_argument("--namespace", default=chartlib.NAMESPACE)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--sa-kubeconfig", type=Path)
    parser.add_argument("--impersonate", action="store_true")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for expression in args.set:
        values = chartlib._merge(values, helm.parse_set_string(expression))
    plane = ControlPlane(args.dir)
    objects = install_chart(plane, values, release=args.release, namespace=args.namespace)
    if args.sa_kubeconfig:
        sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        plane.write_sa_kubeconfig(args.sa_kubeconfig, args.namespace, sa,
                                  impersonate=args.impersonate)
        print(args.sa_kubeconfig)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(_main(sys.argv[1:]))
