#!/bin/bash
# A stand-in for `strata mount`/`strata umount` made of the kernel's overlayfs,
# to check the tests themselves against the reference:
#   STRATA_TEST_BIN=$PWD/tests/support/kernel-strata.sh cargo test --test mount_semantics
# KEXTRA replaces the default ",redirect_dir=on" (e.g. KEXTRA=",userxattr" or
# KEXTRA=",redirect_dir=on,index=on"). Tests about the daemon do not apply.
# Known kernel differences the tests expect from Strata: .wh. files, user.*
# and fuseoverlayfs opaque markers (kernel: only with userxattr / never),
# hard links kept after copy-up (kernel: only with index=on), no `.wh.*` names.
set -e
cmd=$1
if [ "$cmd" = umount ]; then exec umount "$2"; fi
if [ "$cmd" = mount ]; then shift; fi
if [ "$cmd" = overlay ]; then shift; mp=$1; shift; fi
lowers=(); upper=; work=; opts=
while [ $# -gt 0 ]; do
  case $1 in
    --lower) lowers+=("$2"); shift 2 ;;
    --upper) upper=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -o) opts=$2; shift 2 ;;
    -f|-d|-v) shift ;;
    *) mp=$1; shift ;;
  esac
done
if [ -z "$opts" ]; then
  opts="lowerdir=$(IFS=:; echo "${lowers[*]}")"
  if [ -n "$upper" ]; then opts="$opts,upperdir=$upper,workdir=$work"; fi
fi
exec mount -t overlay overlay -o "$opts${KEXTRA:-,redirect_dir=on}" "$mp"
