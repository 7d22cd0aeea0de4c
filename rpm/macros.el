# EL7's definitions of what Debian's rpm lacks, for building the spec on Debian
# (`make rpm` loads this file only when %{_unitdir} is not defined). Same meaning as
# /usr/lib/rpm/macros.d/macros.systemd of systemd-219 on CentOS 7.
%_unitdir /usr/lib/systemd/system
%_sharedstatedir /var/lib
%_localstatedir /var
%systemd_post() \
if [ $1 -eq 1 ] ; then \
        # Initial installation \
        systemctl preset %{?*} >/dev/null 2>&1 || : \
fi \
%{nil}
%systemd_preun() \
if [ $1 -eq 0 ] ; then \
        # Package removal, not upgrade \
        systemctl --no-reload disable %{?*} > /dev/null 2>&1 || : \
        systemctl stop %{?*} > /dev/null 2>&1 || : \
fi \
%{nil}
%systemd_postun_with_restart() \
systemctl daemon-reload >/dev/null 2>&1 || : \
if [ $1 -ge 1 ] ; then \
        # Package upgrade, not uninstall \
        systemctl try-restart %{?*} >/dev/null 2>&1 || : \
fi \
%{nil}
