# Install locations shared by scripts/install and scripts/uninstall (sourced, needs
# PREFIX). Units, sysusers and tmpfiles go below $PREFIX/lib when systemd searches there
# (/usr, /usr/local), else in /usr/lib; SYSTEMD_UNIT_DIR, SYSUSERS_DIR and TMPFILES_DIR
# override them. dbus-daemon reads system-bus policies only from /usr/share/dbus-1.
BINDIR=$PREFIX/bin
LIBDIR=$PREFIX/lib/diffusiond
# Split-off debug info of the binaries (.build-id/xx/yyyy.debug; scripts/split-debug.sh).
DEBUGDIR=$PREFIX/lib/debug
DATADIR=$PREFIX/share/diffusiond
MODELDIR=$DATADIR/models/demo
DOCDIR=$PREFIX/share/doc/diffusiond
MANIFEST=$DATADIR/install-manifest.txt
case "$PREFIX" in
  /usr|/usr/local) syslib=$PREFIX/lib ;;
  *) syslib=/usr/lib ;;
esac
UNITDIR=${SYSTEMD_UNIT_DIR:-$syslib/systemd/system}
SYSUSERSDIR=${SYSUSERS_DIR:-$syslib/sysusers.d}
TMPFILESDIR=${TMPFILES_DIR:-$syslib/tmpfiles.d}
DBUS_POLICY_DIR=/usr/share/dbus-1/system.d
DBUS_SERVICES_DIR=/usr/share/dbus-1/system-services
DBUS_SESSION_SERVICES_DIR=$PREFIX/share/dbus-1/services
CONFIG=/etc/diffusiond/diffusiond.toml
