"""orgmail: an organisation's own mail service on AWS, DNS at Cloudflare."""

from components.program import main

main()
