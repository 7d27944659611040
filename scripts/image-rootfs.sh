#!/usr/bin/env bash
# The root filesystem of the operator's image, assembled from a built cohort-operator binary
# and this Debian system. Used by scripts/image.sh (umoci, no container engine) and by the
# Dockerfile's build stage, so both images hold the same files:
#
#   /usr/local/bin/cohort-operator    the binary (glibc, dynamically linked)
#   its shared libraries              exactly those `ldd` lists, at the paths it lists, with
#                                     the Debian copyright file of each package they come from
#   /etc/ssl/certs/ca-certificates.crt  Debian's CA bundle (Braze, HTTP exports, warehouses)
#   /etc/passwd, /etc/group           root and `nonroot` (65532), the user the image runs as
#   /etc/nsswitch.conf                hosts: files dns
#   /tmp, /home/nonroot               empty (the chart mounts an emptyDir at /tmp)
#   /usr/share/doc/cohort-operator/   LICENSE, NOTICE if any, the third-party license list
#
# No shell, no package manager.
#
#   scripts/image-rootfs.sh BINARY DIR     (DIR must not exist yet)
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=${1:?usage: $0 BINARY DIR}
ROOTFS=${2:?usage: $0 BINARY DIR}
[ ! -e "$ROOTFS" ] || { echo "image-rootfs: $ROOTFS exists" >&2; exit 2; }

install -D -m 0555 "$BINARY" "$ROOTFS/usr/local/bin/cohort-operator"
package_of() { # the Debian package owning $1 (merged /usr: dpkg may know either path)
  dpkg-query -S "$1" 2>/dev/null | head -n1 | cut -d: -f1
}
# Exactly the libraries the binary loads (and the loader), at the paths the loader uses.
for lib in $(ldd "$BINARY" | grep -o '/[^ ]*' | sort -u); do
  # Executable: the loader is exec'd by the kernel (Debian ships them 0755).
  install -D -m 0555 "$(realpath "$lib")" "$ROOTFS$lib"
  package=$(package_of "$lib")
  [ -n "$package" ] || package=$(package_of "$(realpath "$lib")")
  [ -n "$package" ] || { echo "image-rootfs: no Debian package owns $lib" >&2; exit 1; }
  install -D -m 0444 "/usr/share/doc/$package/copyright" "$ROOTFS/usr/share/doc/$package/copyright"
done
install -D -m 0444 /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
install -D -m 0444 /usr/share/doc/ca-certificates/copyright "$ROOTFS/usr/share/doc/ca-certificates/copyright"
install -D -m 0444 LICENSE "$ROOTFS/usr/share/doc/cohort-operator/LICENSE"
[ ! -f NOTICE ] || install -D -m 0444 NOTICE "$ROOTFS/usr/share/doc/cohort-operator/NOTICE"
install -D -m 0444 docs/third-party-licenses.md "$ROOTFS/usr/share/doc/cohort-operator/third-party-licenses.md"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  > "$ROOTFS/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$ROOTFS/etc/group"
# glibc's resolver reads it: files, then DNS, as a Pod's /etc/hosts and resolv.conf expect.
printf 'hosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"
chmod 0444 "$ROOTFS/etc/passwd" "$ROOTFS/etc/group" "$ROOTFS/etc/nsswitch.conf"
mkdir -p "$ROOTFS/tmp" "$ROOTFS/home/nonroot"
chmod 1777 "$ROOTFS/tmp"
chown 65532:65532 "$ROOTFS/home/nonroot"
