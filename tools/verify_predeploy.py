"""Before the first `pulumi up`: records already in the live zones that clash with the stack's.

A domain moving to orgmail usually has SPF, DMARC and MX records of its old provider. Cloudflare
accepts a second SPF or DMARC record beside them, and two SPF records are a permanent error (RFC 7208
3.2): every message then fails SPF. `python -m tools.verify Pulumi.<stack>.yaml --pre-deploy` lists
each such record with the exact change (docs/verify.md, "Before the first deploy").
"""

from __future__ import annotations

from typing import Any

from tools.verify import CLOUDFLARE_CAA, ERROR, OK, Check, Expected, Resolver, _canonical, zone_line

STACK_SPF = "v=spf1"


def _ours(exp: Expected, name: str, type_: str, prefix: str = "") -> list[dict[str, Any]]:
    return [r for r in exp.of(name, type_) if type_ != "TXT" or _text(r).startswith(prefix)]


def _text(record: dict[str, Any]) -> str:
    return _canonical(record["type"], record["content"]) if record["type"] == "TXT" else str(record["content"])


def _quoted(name: str, type_: str, value: str) -> str:
    return f'{name}. IN {type_} "{value}"' if type_ == "TXT" else f"{name}. IN {type_} {value}"


def _clash(check: str, name: str, type_: str, found: list[str], ours: list[dict[str, Any]], why: str,
           advice: str = "") -> Check:
    deletes = "; ".join(f"delete `{_quoted(name, type_, v)}`" for v in found)
    publishes = " | ".join(zone_line(r) for r in ours)
    fix = f"{deletes}{'; ' + advice if advice else ''}" + (f" (the stack publishes {publishes})" if publishes else "")
    return Check(f"pre-deploy:{check}", name, ERROR, f"{len(found)} existing {type_}: {why}", fix)


def check_txt(exp: Expected, res: Resolver, check: str, name: str, prefix: str, why: str,
              advice: str = "") -> Check:
    """An existing TXT record of the kind (v=spf1, v=DMARC1, ...) the stack publishes at `name`."""
    ours = _ours(exp, name, "TXT", prefix)
    found = [v for v in res.values(name, "TXT") if v.lower().startswith(prefix.lower())]
    if not found:
        return Check(f"pre-deploy:{check}", name, OK, f"no {prefix} record yet")
    if [_text(r) for r in ours] == found:
        return _clash(check, name, "TXT", found, ours, "the same record the stack creates; Cloudflare refuses a "
                      "second identical record, so the deploy would fail")
    return _clash(check, name, "TXT", found, ours, why, advice)


def check_spf(exp: Expected, res: Resolver, name: str) -> Check:
    ours = _ours(exp, name, "TXT", STACK_SPF)
    mine = set(_text(ours[0]).split()[1:]) if ours else set()
    found = [v for v in res.values(name, "TXT") if v.lower().startswith("v=spf1")]
    lost = sorted({t for v in found for t in v.split()[1:] if t not in mine and not t.endswith("all")})
    advice = (f"it also authorises {' '.join(lost)}, which the stack's record does not: mail sent from there "
              "would fail SPF, so send it through this stack's hosts instead" if lost else "")
    check = check_txt(exp, res, "spf", name, STACK_SPF,
                      "a second SPF record beside the stack's is a permanent error (RFC 7208 3.2): every "
                      "message would fail SPF", advice)
    return check


def check_mx(exp: Expected, res: Resolver, domain: str) -> Check:
    ours = _ours(exp, domain, "MX")
    mine = {(int(r["priority"]), str(r["content"]).rstrip(".").lower()) for r in ours}
    found = []
    for v in res.values(domain, "MX"):
        prio, host = v.split()
        if (int(prio), host.rstrip(".").lower()) not in mine:
            found.append(v)
    if not found:
        return Check("pre-deploy:mx", domain, OK, "no other MX records")
    return _clash("mx", domain, "MX", found, ours,
                  "the stack adds its MX records beside these, and senders would split mail between the old "
                  "servers and the new ones",
                  "delete them at the cut-over, when you run `pulumi up`, after the mailboxes are moved")


def check_dkim(exp: Expected, res: Resolver, name: str) -> Check:
    found = res.values(name, "TXT") or res.values(name, "CNAME")
    if not found:
        return Check("pre-deploy:dkim", name, OK, "selector not in use")
    return _clash("dkim", name, "TXT" if res.values(name, "TXT") else "CNAME", found, _ours(exp, name, "TXT"),
                  "another key is published under the stack's selector; signatures of one of the two would fail",
                  "or choose another orgmail:dkimSelector")


def check_caa(exp: Expected, res: Resolver, host: str) -> Check:
    ours = _ours(exp, host, "CAA")
    mine = {_canonical("CAA", str(r["content"])) for r in ours}
    found = [v for v in res.values(host, "CAA") if v not in mine and v not in CLOUDFLARE_CAA]
    if not found:
        return Check("pre-deploy:caa", host, OK, "no other CAA records")
    return _clash("caa", host, "CAA", found, ours,
                  "CAs honour the union of CAA records at a name: these would allow CAs the stack does not, or "
                  "restrict the host's Let's Encrypt certificate")


def check_address(exp: Expected, res: Resolver, name: str, what: str) -> Check:
    """A host name the stack points somewhere (mail host: its Elastic IP; mta-sts: the Worker) is free."""
    found = [(t, v) for t in ("CNAME", "A", "AAAA") for v in res.values(name, t)][:3]
    if not found:
        return Check("pre-deploy:name", name, OK, "not in use")
    type_ = found[0][0]
    return _clash("name", name, type_, [v for t, v in found if t == type_], _ours(exp, name, "A"),
                  f"already in use; the stack makes it {what}")


def pre_deploy_checks(exp: Expected, res: Resolver) -> list[Check]:
    """Every existing record the stack would duplicate or clash with, and what to change."""
    s = exp.settings
    checks: list[Check] = []
    for d in s.domains:
        checks.append(check_spf(exp, res, d.name))
        checks.append(check_txt(exp, res, "dmarc", f"_dmarc.{d.name}", "v=DMARC1",
                                "receivers take no policy at all when there are two DMARC records (RFC 7489 6.6.3)"))
        checks.append(check_mx(exp, res, d.name))
        checks.append(check_txt(exp, res, "mta-sts", f"_mta-sts.{d.name}", "v=STSv1",
                                "two MTA-STS records make senders ignore the policy (RFC 8461 3.1)"))
        checks.append(check_address(exp, res, f"mta-sts.{d.name}", "the stack's MTA-STS Worker"))
        checks.append(check_txt(exp, res, "tls-rpt", f"_smtp._tls.{d.name}", "v=TLSRPTv1",
                                "two TLS-RPT records make senders send no reports (RFC 8460 3)"))
        checks += [check_dkim(exp, res, f"{sel}._domainkey.{d.name}") for sel in s.dkim_selectors]
    for host in s.mx_hosts:
        checks.append(check_address(exp, res, host, "the host's Elastic IP"))
        checks.append(check_spf(exp, res, host))
        checks.append(check_caa(exp, res, host))
    return checks
