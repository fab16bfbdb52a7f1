# shellcheck shell=bash
# Splitting the debug info off a binary, as Debian's dh_strip does (sourced by
# scripts/install and scripts/bundle; needs readelf, objcopy and strip from binutils).
#
# The release profile keeps line tables (Cargo.toml: debug = "line-tables-only") for
# backtraces; an installed binary carries none of it. It is stripped of its debug sections
# (the symbol table stays, so a panic's backtrace still names functions), and the debug
# info goes to a separate file named after the binary's GNU build ID, which the binary
# points at with a .gnu_debuglink section (file name and CRC):
#
#   PREFIX/lib/debug/.build-id/xx/yyyyyyyy.debug      (xx: the ID's first byte in hex)
#
# With PREFIX=/usr that is where Debian's -dbgsym packages put theirs, and gdb, elfutils,
# systemd-coredump and Rust's own backtraces look there; for other prefixes, see
# docs/bundle.md ("Debug info"). A binary without a build ID gets the path form instead
# (PREFIX/lib/debug/<installed path>.debug, gdb's other lookup).

# has_debug_info FILE: whether FILE has DWARF sections (.debug_info or .debug_line).
has_debug_info() {
  local sections
  sections=$(readelf -S -W "$1" 2>/dev/null) || return 1
  grep -qE ' \.debug_(info|line) ' <<<"$sections"
}

# build_id FILE: the GNU build ID in hex, or nothing.
build_id() {
  local notes
  notes=$(readelf -n "$1" 2>/dev/null) || return 0
  sed -n '/^ *Build ID: [0-9a-f]*$/{s/^ *Build ID: //p;q}' <<<"$notes"
}

# debug_file_rel FILE INSTALLED_PATH: where FILE's debug info goes, relative to
# PREFIX/lib/debug: .build-id/xx/yyyy.debug, or INSTALLED_PATH.debug without a build ID.
debug_file_rel() {
  local id
  id=$(build_id "$1")
  if [ -n "$id" ]; then
    printf '.build-id/%s/%s.debug\n' "${id:0:2}" "${id:2}"
  else
    printf '%s.debug\n' "${2#/}"
  fi
}

# split_debug SRC OUT DEBUG: writes DEBUG (SRC's debug info and symbols, objcopy
# --only-keep-debug) and OUT (SRC without its debug sections, with a .gnu_debuglink to
# DEBUG's file name). SRC is not changed. DEBUG's name must be its installed name.
split_debug() {
  local src=$1 out=$2 debug=$3
  mkdir -p "$(dirname "$out")" "$(dirname "$debug")"
  objcopy --only-keep-debug "$src" "$debug"
  chmod 0644 "$debug"
  strip --strip-debug --remove-section=.comment -o "$out" "$src"
  objcopy --add-gnu-debuglink="$debug" "$out"
}
