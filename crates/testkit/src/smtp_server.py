"""A recording SMTP server for tests (aiosmtpd), started by testkit::smtp.

Each accepted message becomes DIR/NNNNNN.eml (as received) and DIR/NNNNNN.json (envelope
sender and recipients, the AUTH login if any, whether the connection was encrypted). The
bound port is written to PORT_FILE once the server listens. The server exits when its
standard input closes, so it never outlives the test process that started it.
"""

import argparse
import asyncio
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--user")
    p.add_argument("--password")
    args = p.parse_args()

    class Recorder:
        def __init__(self) -> None:
            self.count = 0

        async def handle_DATA(self, server, session, envelope):
            self.count += 1
            record = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "auth_login": session.auth_data if isinstance(session.auth_data, str) else None,
                "tls": server.transport.get_extra_info("ssl_object") is not None,
            }
            base = os.path.join(args.dir, "%06d" % self.count)
            with open(base + ".eml", "wb") as f:
                f.write(envelope.original_content)
            # The record is written aside and renamed last, so a reader that sees it finds
            # the whole message.
            with open(base + ".tmp", "w") as f:
                json.dump(record, f)
            os.rename(base + ".tmp", base + ".json")
            return "250 Message accepted"

    def authenticate(server, session, envelope, mechanism, auth_data):
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == args.user
            and auth_data.password.decode() == args.password
        ):
            return AuthResult(success=True, auth_data=args.user)
        return AuthResult(success=False, handled=False)

    context = None
    if args.tls != "none":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Recorder()

    def factory():
        return SMTP(
            handler,
            hostname="smtp.testkit.invalid",
            enable_SMTPUTF8=True,
            tls_context=context if args.tls == "starttls" else None,
            require_starttls=args.tls == "starttls",
            auth_required=args.user is not None,
            # Implicit TLS is encrypted from the start, which aiosmtpd does not track.
            auth_require_tls=args.tls == "starttls",
            authenticator=authenticate if args.user is not None else None,
            loop=loop,
        )

    server = loop.run_until_complete(
        loop.create_server(
            factory, "127.0.0.1", 0, ssl=context if args.tls == "implicit" else None
        )
    )
    port = server.sockets[0].getsockname()[1]
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(args.port_file + ".tmp", args.port_file)

    def on_stdin() -> None:
        if not sys.stdin.buffer.read1(4096):
            loop.stop()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    loop.run_forever()
    server.close()


if __name__ == "__main__":
    main()
