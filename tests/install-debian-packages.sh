#!/bin/sh
# What the tests need from Debian, installed where missing: chromium for the report's browser
# tests (never a browser download), and Ceph's monitor, OSD and RADOS Gateway for the tests
# against a real S3 server (tests/ceph_rgw.py starts a single-node cluster on loopback).
set -e
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
for tool in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then as_root=""; elif command -v sudo >/dev/null 2>&1; then as_root="sudo"; else
  echo "the tests need Debian's$missing: install them as root with 'apt-get install --no-install-recommends$missing'" >&2
  exit 1
fi
$as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
