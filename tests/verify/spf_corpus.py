"""SPF records of large senders, served by the test bed's Knot (zones added in harness.build_stack).

Transcribed from the providers' published records (`dig TXT`; Google's ranges as its support page
https://support.google.com/a/answer/60764 lists them); the live values change over time, what
matters here is their shape: ip4/ip6 prefixes of every length in use, include chains, redirect=,
exists: with macros. They are not fetched from the internet here.
"""

from __future__ import annotations

GOOGLE_IP4 = ("35.190.247.0/24", "64.233.160.0/19", "66.102.0.0/20", "66.249.80.0/20", "72.14.192.0/18",
              "74.125.0.0/16", "108.177.8.0/21", "173.194.0.0/16", "209.85.128.0/17", "216.58.192.0/19",
              "216.239.32.0/19")
GOOGLE_IP6 = ("2001:4860:4000::/36", "2404:6800:4000::/36", "2607:f8b0:4000::/36", "2800:3f0:4000::/36",
              "2a00:1450:4000::/36", "2c0f:fb50:4000::/36")
GOOGLE_IP4_MORE = ("172.217.0.0/19", "172.217.32.0/20", "172.217.128.0/19", "172.217.160.0/20",
                   "172.217.192.0/19", "172.253.56.0/21", "172.253.112.0/20", "108.177.96.0/19",
                   "35.191.0.0/16", "130.211.0.0/22")
MICROSOFT = ("ip4:40.92.0.0/15 ip4:40.107.0.0/16 ip4:52.100.0.0/15 ip4:52.102.0.0/16 ip4:52.103.0.0/17 "
             "ip4:104.47.0.0/17 ip6:2a01:111:f400::/48 ip6:2a01:111:f403::/49 ip6:2a01:111:f403:8000::/50 "
             "ip6:2a01:111:f403:c000::/51 ip6:2a01:111:f403:f000::/52")
AMAZON_SES = ("ip4:199.255.192.0/22 ip4:199.127.232.0/22 ip4:54.240.0.0/18 ip4:69.169.224.0/20 "
              "ip4:23.249.208.0/20 ip4:23.251.224.0/19 ip4:76.223.176.0/20 ip4:54.240.64.0/19 "
              "ip4:54.240.96.0/19 ip4:76.223.128.0/19 ip4:216.221.160.0/19 ip4:206.55.144.0/20")


def _txt(name: str, record: str) -> str:
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    return f"{name}. 300 IN TXT {strings}"


# zone -> record lines
ZONES: dict[str, list[str]] = {
    "google.com": [
        _txt("_spf.google.com", "v=spf1 include:_netblocks.google.com include:_netblocks2.google.com "
                                "include:_netblocks3.google.com ~all"),
        _txt("_netblocks.google.com", "v=spf1 " + " ".join(f"ip4:{n}" for n in GOOGLE_IP4) + " ~all"),
        _txt("_netblocks2.google.com", "v=spf1 " + " ".join(f"ip6:{n}" for n in GOOGLE_IP6) + " ~all"),
        _txt("_netblocks3.google.com", "v=spf1 " + " ".join(f"ip4:{n}" for n in GOOGLE_IP4_MORE) + " ~all"),
    ],
    "gmail.com": [_txt("gmail.com", "v=spf1 redirect=_spf.google.com")],
    "outlook.com": [
        _txt("spf.protection.outlook.com", f"v=spf1 {MICROSOFT} include:spfd.protection.outlook.com -all"),
        _txt("spfd.protection.outlook.com", "v=spf1 ip4:51.4.72.0/24 ip4:51.5.72.0/24 ip4:51.5.80.0/27 "
                                            "ip4:51.4.80.0/27 ip6:2a01:4180:4051:0800::/64 "
                                            "ip6:2a01:4180:4050:0800::/64 -all"),
    ],
    "amazonses.com": [_txt("amazonses.com", f"v=spf1 {AMAZON_SES} -all")],
    # exists: with the %{i} macro: the list answers an A record for every address it authorises.
    "salesforce.com": [_txt("_spf.salesforce.com", "v=spf1 exists:%{i}._spf.mta.salesforce.com -all")],
}
